"""The sensor of a labelled scene (:class:`~changedet.sensor.Sensor`, re-exported here for the evaluation stages)."""

from __future__ import annotations

from changedet.data.scenes import ChangeScene
from changedet.sensor import SENTINEL2_L1C, Sensor, sensor_for

__all__ = ["SENTINEL2_L1C", "Sensor", "scene_sensor", "sensor_for"]


def scene_sensor(scene: ChangeScene) -> Sensor:
    """:func:`sensor_for` of date 1 of ``scene``."""
    return sensor_for(scene.bands[0], [b.dtype for b in scene.pair.t1.bands])
