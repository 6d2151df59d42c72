"""The data path of ``changedet detect``, one module per step, in the order a run takes them:

1. :mod:`~changedet.pipeline.params` — :class:`DetectParams`, every option with its default and bounds;
2. :mod:`~changedet.pipeline.grid`, :mod:`~changedet.pipeline.align` — the common grid of both dates
   and the lazy, windowed reader of the aligned pair;
3. :mod:`~changedet.pipeline.tiling` — overlapping tiles over that grid;
4. :mod:`~changedet.pipeline.predictor` — the model a run uses (bundled name, checkpoint or registry
   name), built once, with its scene statistics;
5. :mod:`~changedet.pipeline.inference` — the scene-inference runner: normalise → transform → forward →
   blend (used by detect, training validation and every evaluation stage);
6. :mod:`~changedet.pipeline.planning` — everything decided before the first tile (inputs, grid,
   tiles, scene fit, content fingerprint);
7. :mod:`~changedet.pipeline.tilestore` — per-tile results that survive a killed run;
8. :mod:`~changedet.pipeline.mosaic` — streaming blend of overlapping tiles into rows;
9. :mod:`~changedet.pipeline.outputs` — the output table and the atomic writing of COGs, polygons,
   styles, quicklook and ``run.json``;
10. :mod:`~changedet.pipeline.detect` — the steps chained in one process (the CLI) or per task (flows).
"""
