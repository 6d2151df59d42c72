"""Evaluation stages beyond clean metrics: adversarial robustness and domain shift.

* :mod:`~changedet.evaluation.adversarial` — FGSM/PGD on t1, t2 or both, untargeted and targeted
  (hide/fake changes), in physical (reflectance) units, on detect's tiling;
* :mod:`~changedet.evaluation.defence` — PGD adversarial fine-tuning of a checkpoint;
* :mod:`~changedet.evaluation.domain_shift` — a registry of radiometric/geometric shifts with severities;
* :mod:`~changedet.evaluation.adaptation` — AdaBN and histogram matching at test time;
* :mod:`~changedet.evaluation.calibration` — expected calibration error;
* :mod:`~changedet.evaluation.runs` / :mod:`~changedet.evaluation.report` — jobs, summary, report files.
"""

from changedet.evaluation.adaptation import (
    adabn,
    match_histograms,
    match_scene,
    reference_quantiles,
)
from changedet.evaluation.adversarial import (
    METHODS,
    MODES,
    Attack,
    evaluate_attack,
    perturb,
)
from changedet.evaluation.calibration import expected_calibration_error, histogram_ece
from changedet.evaluation.defence import adversarial_finetune, finetune_checkpoint
from changedet.evaluation.domain_shift import (
    SHIFTS,
    apply_shift,
    evaluate_shift,
    shift_scene,
)
from changedet.evaluation.runs import (
    DomainShiftConfig,
    RobustnessConfig,
    plan_jobs,
    run_evaluation,
    run_job,
    summarize,
)
from changedet.evaluation.sensor import Sensor, scene_sensor

__all__ = [
    "METHODS",
    "MODES",
    "SHIFTS",
    "Attack",
    "DomainShiftConfig",
    "RobustnessConfig",
    "Sensor",
    "adabn",
    "adversarial_finetune",
    "apply_shift",
    "evaluate_attack",
    "evaluate_shift",
    "expected_calibration_error",
    "finetune_checkpoint",
    "histogram_ece",
    "match_histograms",
    "match_scene",
    "perturb",
    "plan_jobs",
    "reference_quantiles",
    "run_evaluation",
    "run_job",
    "scene_sensor",
    "shift_scene",
    "summarize",
]
