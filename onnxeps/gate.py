"""Gate a model on its epsilon: a minimum value, and a maximum drop against a baseline.

Each check ends in one status. ``passed`` and ``failed`` are verdicts. ``undefined``
means an epsilon the check needs is undefined (the reason is in the message), and
``error`` means a model or input could not be evaluated at all. The exit code follows
the linter convention: 0 every check passed, 1 a check failed, 3 an epsilon is
undefined, 2 a model or input cannot be evaluated. When statuses differ, the most
severe decides, in the order error, undefined, failed, passed: the gate reports that
it could not judge before it reports a verdict.

The baseline is scored with the same options as the model, so both see the same batch
when their inputs have the same shapes.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field

from onnxeps.errors import OnnxepsError
from onnxeps.report import atomic_write
from onnxeps.score import ScoreResult, score

__all__ = [
    "CHECK_COLUMNS",
    "GateCheck",
    "GateResult",
    "check_min_epsilon",
    "check_baseline",
    "relative_drop_pct",
    "exit_code",
    "run_gate",
    "junit_xml",
    "write_junit",
]

log = logging.getLogger(__name__)

MIN_EPSILON = "min-epsilon"
BASELINE = "baseline"
CHECK_COLUMNS = [
    "check", "model", "epsilon", "baseline", "baseline_epsilon", "drop_pct",
    "threshold", "status", "passed", "message",
]  # fmt: skip
_EXIT_CODES = {"passed": 0, "failed": 1, "undefined": 3, "error": 2}
_SEVERITY = ("passed", "failed", "undefined", "error")
# Score-record keys copied into the JUnit report's properties.
_PROPERTY_KEYS = (
    "sha256", "epsilon", "reason", "weights", "batch_size", "input", "provider",
)  # fmt: skip


@dataclass
class GateCheck:
    """The outcome of one check, with fields in the record's column order.

    ``threshold`` is the minimum epsilon for ``min-epsilon`` and the largest allowed
    drop in percent for ``baseline``. ``drop_pct`` is the relative drop of epsilon
    from the baseline's, in percent (negative when epsilon rose).
    """

    check: str
    model: str
    epsilon: float | None
    baseline: str | None
    baseline_epsilon: float | None
    drop_pct: float | None
    threshold: float
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def record(self) -> dict:
        """Return the check record: ``kind`` "check", then the fields in column order."""
        values = asdict(self)
        record = {"kind": "check"}
        for column in CHECK_COLUMNS:
            record[column] = self.passed if column == "passed" else values[column]
        return record


@dataclass
class GateResult:
    """The scores of the model and the baseline (None when scoring failed), every
    check, and the scoring errors as (model, error) pairs."""

    model: str
    baseline: str | None = None
    model_score: ScoreResult | None = None
    baseline_score: ScoreResult | None = None
    checks: list[GateCheck] = field(default_factory=list)
    errors: list[tuple[str, Exception]] = field(default_factory=list)

    @property
    def scores(self) -> list[ScoreResult]:
        return [s for s in (self.model_score, self.baseline_score) if s is not None]

    @property
    def exit_code(self) -> int:
        return exit_code(self.checks)

    def records(self) -> list[dict]:
        """Return the score records (``kind`` "score") followed by the check records."""
        scores = [{"kind": "score", **result.record()} for result in self.scores]
        return scores + [check.record() for check in self.checks]


def relative_drop_pct(epsilon: float, baseline_epsilon: float) -> float:
    """Return the drop of ``epsilon`` below ``baseline_epsilon`` in percent of the latter.

    Epsilon is never negative, so a baseline of 0 cannot be undercut: the drop is 0.
    """
    if baseline_epsilon == 0:
        return 0.0
    return 100.0 * (baseline_epsilon - epsilon) / baseline_epsilon


def _undefined_message(label: str, result: ScoreResult) -> str:
    return f"epsilon of {result.model} ({label}) is undefined: {result.reason}"


def check_min_epsilon(result: ScoreResult, minimum: float) -> GateCheck:
    """Check that the model's epsilon is at least ``minimum``."""
    check = GateCheck(
        MIN_EPSILON, result.model, result.epsilon, None, None, None, minimum, "", ""
    )
    if result.epsilon is None:
        check.status = "undefined"
        check.message = _undefined_message("model", result)
    elif result.epsilon >= minimum:
        check.status = "passed"
        check.message = f"epsilon {result.epsilon:.6g} >= minimum {minimum:.6g}"
    else:
        check.status = "failed"
        check.message = f"epsilon {result.epsilon:.6g} is below the minimum {minimum:.6g}"
    return check


def check_baseline(
    result: ScoreResult, baseline: ScoreResult, max_drop_pct: float
) -> GateCheck:
    """Check that epsilon dropped at most ``max_drop_pct`` percent from the baseline's."""
    check = GateCheck(
        BASELINE, result.model, result.epsilon, baseline.model, baseline.epsilon,
        None, max_drop_pct, "", "",
    )  # fmt: skip
    if result.epsilon is None:
        check.status = "undefined"
        check.message = _undefined_message("model", result)
        return check
    if baseline.epsilon is None:
        check.status = "undefined"
        check.message = _undefined_message("baseline", baseline)
        return check
    drop = relative_drop_pct(result.epsilon, baseline.epsilon)
    check.drop_pct = drop
    movement = f"a drop of {drop:.4g} %" if drop >= 0 else f"a rise of {-drop:.4g} %"
    change = (
        f"epsilon {result.epsilon:.6g} against the baseline's {baseline.epsilon:.6g}: "
        f"{movement}"
    )
    if drop <= max_drop_pct:
        check.status = "passed"
        check.message = f"{change}, within the allowed {max_drop_pct:.4g} %"
    else:
        check.status = "failed"
        check.message = f"{change}, more than the allowed {max_drop_pct:.4g} %"
    return check


def _error_check(
    name: str, model: str, baseline: str | None, threshold: float, message: str
) -> GateCheck:
    return GateCheck(name, model, None, baseline, None, None, threshold, "error", message)


def exit_code(checks: list[GateCheck]) -> int:
    """Return the exit code of the most severe status (0 when there are no checks)."""
    if not checks:
        return 0
    worst = max(checks, key=lambda check: _SEVERITY.index(check.status))
    return _EXIT_CODES[worst.status]


def _score_or_error(model, inputs, options: dict, errors: list) -> ScoreResult | None:
    """Score one model; on failure store (model, error) and return None."""
    try:
        return score(model, inputs, **options)
    except Exception as error:  # any failure means the model cannot be evaluated
        errors.append((os.fspath(model), error))
        return None


def _warn_if_batches_differ(result: ScoreResult, baseline: ScoreResult) -> None:
    if (result.input, result.batch_size) != (baseline.input, baseline.batch_size):
        log.warning(
            "%s and baseline %s were scored on different batches (%s, %d samples and "
            "%s, %d samples); the epsilon drop compares unlike runs",
            result.model, baseline.model, result.input, result.batch_size,
            baseline.input, baseline.batch_size,
        )  # fmt: skip


def run_gate(
    model: str | os.PathLike,
    inputs=None,
    *,
    min_epsilon: float | None = None,
    baseline: str | os.PathLike | None = None,
    max_drop_pct: float | None = None,
    **score_options,
) -> GateResult:
    """Score the model (and the baseline, with the same options) and run the checks.

    ``score_options`` are the keyword arguments of :func:`onnxeps.score`. A failure to
    score either model does not raise. It is stored in ``errors`` and turns the checks
    that need that model into ``error`` checks. Raises ValueError when no check is
    requested or when exactly one of ``baseline`` and ``max_drop_pct`` is given.
    """
    if (baseline is None) != (max_drop_pct is None):
        raise ValueError("baseline and max_drop_pct must be given together")
    if min_epsilon is None and baseline is None:
        raise ValueError(
            "no check requested: give min_epsilon, or baseline and max_drop_pct"
        )
    label = os.fspath(model)
    gate = GateResult(label, None if baseline is None else os.fspath(baseline))
    gate.model_score = _score_or_error(model, inputs, score_options, gate.errors)
    # A baseline is not scored when the model failed: every check is an error anyway.
    if baseline is not None and gate.model_score is not None:
        gate.baseline_score = _score_or_error(baseline, inputs, score_options, gate.errors)
    if min_epsilon is not None:
        gate.checks.append(_min_epsilon_or_error(gate, min_epsilon))
    if baseline is not None:
        gate.checks.append(_baseline_or_error(gate, max_drop_pct))
    return gate


def _failure_message(gate: GateResult) -> str:
    """Describe the first scoring error as one line that names the model."""
    name, error = gate.errors[0]
    text = str(error)
    if not isinstance(error, OnnxepsError):
        text = f"internal error ({type(error).__name__}: {text})"
    return text if text.startswith(name) else f"{name}: {text}"


def _min_epsilon_or_error(gate: GateResult, minimum: float) -> GateCheck:
    if gate.model_score is None:
        return _error_check(MIN_EPSILON, gate.model, None, minimum, _failure_message(gate))
    return check_min_epsilon(gate.model_score, minimum)


def _baseline_or_error(gate: GateResult, max_drop_pct: float) -> GateCheck:
    if gate.model_score is None or gate.baseline_score is None:
        return _error_check(
            BASELINE, gate.model, gate.baseline, max_drop_pct, _failure_message(gate)
        )
    _warn_if_batches_differ(gate.model_score, gate.baseline_score)
    return check_baseline(gate.model_score, gate.baseline_score, max_drop_pct)


def _suite_element(gate: GateResult) -> ElementTree.Element:
    counts = {status: 0 for status in _SEVERITY}
    for check in gate.checks:
        counts[check.status] += 1
    seconds = sum(result.seconds for result in gate.scores)
    return ElementTree.Element(
        "testsuite",
        {
            "name": f"onnxeps gate {gate.model}",
            "tests": str(len(gate.checks)),
            "failures": str(counts["failed"]),
            "errors": str(counts["undefined"] + counts["error"]),
            "skipped": "0",
            "time": f"{seconds:.3f}",
        },
    )


def _add_properties(suite: ElementTree.Element, gate: GateResult) -> None:
    properties = ElementTree.SubElement(suite, "properties")
    for prefix, result in (("model", gate.model_score), ("baseline", gate.baseline_score)):
        if result is None:
            continue
        record = result.record()
        for key in _PROPERTY_KEYS:
            value = record[key]
            text = "" if value is None else str(value)
            ElementTree.SubElement(
                properties, "property", {"name": f"{prefix}.{key}", "value": text}
            )


def _add_testcase(suite: ElementTree.Element, check: GateCheck) -> None:
    case = ElementTree.SubElement(
        suite, "testcase", {"classname": check.model, "name": check.check}
    )
    if check.status == "failed":
        child = ElementTree.SubElement(
            case, "failure", {"message": check.message, "type": check.check}
        )
        child.text = check.message
    elif check.status in ("undefined", "error"):
        kind = "undefined epsilon" if check.status == "undefined" else "evaluation error"
        child = ElementTree.SubElement(
            case, "error", {"message": check.message, "type": kind}
        )
        child.text = check.message
    output = ElementTree.SubElement(case, "system-out")
    output.text = check.message


def junit_xml(gate: GateResult) -> bytes:
    """Return a JUnit XML report: one testsuite, one testcase per check.

    A failed check becomes a ``failure`` element. An undefined epsilon or a model that
    could not be evaluated becomes an ``error`` element. The report carries no
    timestamp, so reruns of the same gate differ only in the ``time`` attribute.
    """
    root = ElementTree.Element("testsuites", {"name": "onnxeps gate"})
    suite = _suite_element(gate)
    for key in ("tests", "failures", "errors", "time"):
        root.set(key, suite.get(key))
    root.append(suite)
    _add_properties(suite, gate)
    for check in gate.checks:
        _add_testcase(suite, check)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write_junit(gate: GateResult, path: str | os.PathLike) -> None:
    """Write the JUnit XML report atomically."""
    data = junit_xml(gate)
    atomic_write(path, lambda stream: stream.write(data))
