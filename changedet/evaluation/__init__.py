"""Evaluation stages beyond clean metrics: adversarial robustness and domain shift.

* :mod:`~changedet.evaluation.adversarial` — FGSM/PGD on t1, t2 or both, untargeted and targeted
  (hide/fake changes), in physical (reflectance) units, on detect's tiling;
* :mod:`~changedet.evaluation.defence` — PGD adversarial fine-tuning of a checkpoint;
* :mod:`~changedet.evaluation.domain_shift` — a registry of radiometric/geometric shifts with severities;
* :mod:`~changedet.evaluation.adaptation` — AdaBN and histogram matching at test time;
* :mod:`~changedet.evaluation.calibration` — expected calibration error;
* :mod:`~changedet.evaluation.stages` — the registry of evaluation stages (one module each:
  :mod:`~changedet.evaluation.stages.robustness`, :mod:`~changedet.evaluation.stages.domain_shift`);
* :mod:`~changedet.evaluation.runs` / :mod:`~changedet.evaluation.report` — jobs, summary, report files
  of any registered stage.
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
from changedet.evaluation.runs import plan_jobs, prepare, run_evaluation, run_job, summarize
from changedet.evaluation.stages import EvaluationConfig, Stage, all_stages, get_stage, register_stage
from changedet.evaluation.stages.domain_shift import DomainShiftConfig
from changedet.evaluation.stages.robustness import RobustnessConfig
from changedet.evaluation.sensor import Sensor, scene_sensor

__all__ = [
    "METHODS",
    "MODES",
    "SHIFTS",
    "Attack",
    "DomainShiftConfig",
    "EvaluationConfig",
    "RobustnessConfig",
    "Sensor",
    "Stage",
    "adabn",
    "adversarial_finetune",
    "all_stages",
    "apply_shift",
    "evaluate_attack",
    "evaluate_shift",
    "expected_calibration_error",
    "finetune_checkpoint",
    "get_stage",
    "histogram_ece",
    "match_histograms",
    "match_scene",
    "perturb",
    "plan_jobs",
    "prepare",
    "reference_quantiles",
    "register_stage",
    "run_evaluation",
    "run_job",
    "scene_sensor",
    "shift_scene",
    "summarize",
]
