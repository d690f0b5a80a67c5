"""Stable CamelCase reasons of the Events and conditions the reconcile core emits.

Adapters map Event reasons to metrics (e.g. count ``ROLLING_BACK`` and ``RETRAINING``),
so these strings are part of the operator's interface: change them only with care.
"""

# Events: one per phase transition (and a few notable non-transitions).
COMPRESSION_STARTED = "CompressionStarted"  # a new candidate: initial, specChange or retry
COMPRESSION_RESTARTED = "CompressionRestarted"  # the spec changed under a running candidate
EVALUATION_STARTED = "EvaluationStarted"
JOB_FAILED = "JobFailed"
REJECTED = "Rejected"  # gates failed
AWAITING_APPROVAL = "AwaitingApproval"
APPROVED = "Approved"
PROMOTING = "Promoting"
PROMOTED = "Promoted"  # serving is ready at the promoted revision
RETRY_REQUESTED = "RetryRequested"
DRIFT_DETECTED = "DriftDetected"  # drift confirmed (consecutiveWindows drifting checks)
DRIFT_CLEARED = "DriftCleared"
PERFORMANCE_DRIFT_DETECTED = "PerformanceDriftDetected"  # the same, from online accuracy (spec.drift.performance)
ROLLING_BACK = "RollingBack"  # an automatic rollback started: count these as rollbacks
ROLLED_BACK = "RolledBack"  # serving is ready at the rollback target
NO_ROLLBACK_TARGET = "NoRollbackTarget"
RETRAINING = "Retraining"  # an automatic retrain started: count these as retrains
RETRAIN_LIMIT_REACHED = "RetrainLimitReached"
NO_RETRAIN_DATA = "NoRetrainData"  # only if a manifest bypassed the CEL rule requiring data.retrain
AUTO_ACTIONS_EXHAUSTED = "AutoActionsExhausted"  # paused: maxAutoActions reached
FLAPPING_PREVENTED = "FlappingPrevented"  # paused: the rollback target drifted before
PAUSED = "Paused"  # spec.promotion.paused
RESUMED = "Resumed"
COOLDOWN = "CooldownActive"
ONLINE_STAGE_STARTED = "OnlineStageStarted"  # shadow or canary: a candidate judged on live traffic
CANARY_STEP = "CanaryStepPassed"
ONLINE_GATES_PASSED = "OnlineGatesPassed"
ONLINE_GATES_FAILED = "OnlineGatesFailed"  # the candidate is rejected; all traffic stays on the serving revision
ONLINE_INCONCLUSIVE = "OnlineInconclusive"  # still Inconclusive at the deadline
ONLINE_STAGE_SUPERSEDED = "OnlineStageSuperseded"  # a newer compression started
ONLINE_STAGE_SKIPPED = "OnlineStageSkipped"  # no baseline to serve meanwhile

# Condition reasons (conditions are Ready, Compressed, GatesPassed, Promoted, Drifted).
PENDING = "Pending"
COMPRESSING = "Compressing"
EVALUATING = "Evaluating"
COMPRESSED = "Compressed"
GATES_PASSED = "GatesPassed"
GATES_FAILED = "GatesFailed"
NOT_EVALUATED = "NotEvaluated"
NOTHING_PROMOTED = "NothingPromoted"
SERVING = "Serving"
SERVING_NOT_READY = "ServingNotReady"
NO_DRIFT = "NoDrift"
DRIFT_SUSPECTED = "DriftSuspected"
DRIFT_CONFIRMED = "DriftConfirmed"
PERFORMANCE_DRIFT_SUSPECTED = "PerformanceDriftSuspected"  # Drifted's reasons for an online-accuracy verdict
PERFORMANCE_DRIFT_CONFIRMED = "PerformanceDriftConfirmed"
DRIFT_INCONCLUSIVE = "Inconclusive"
DRIFT_DISABLED = "DriftDisabled"
AWAITING_VERDICT = "AwaitingVerdict"
NOT_SERVING = "NotServing"
