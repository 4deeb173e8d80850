"""onnxeps: score neural-network architectures from ONNX exports with epsilon.

Epsilon (epsinas, arXiv 2302.04406) rewrites every weight of a model to one constant,
runs it on an unlabelled batch for two constants, and measures how the normalised
outputs differ. Higher epsilon predicts higher trained accuracy.
"""

from onnxeps.engine import ScoreFailure, score_many
from onnxeps.errors import OnnxepsError
from onnxeps.metric import EpsilonResult, epsilon
from onnxeps.plan import Plan, PlanEntry, build_plan
from onnxeps.roles import Action, Role
from onnxeps.score import ScoreResult, score

__all__ = [
    "Action",
    "EpsilonResult",
    "OnnxepsError",
    "Plan",
    "PlanEntry",
    "Role",
    "ScoreFailure",
    "ScoreResult",
    "build_plan",
    "epsilon",
    "plan",
    "score",
    "score_many",
]

__version__ = "0.1.0"


def plan(model, *, recurrent_as_weight: bool = False) -> Plan:
    """Return the plan of a model (a path or ModelProto): every float constant's role,
    action and reason. The model is not modified."""
    from onnxeps.load import load_model

    return build_plan(load_model(model).proto, recurrent_as_weight)
