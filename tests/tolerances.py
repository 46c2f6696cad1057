"""Every numerical tolerance of the test suite, in one place."""

#: float32 scores computed by two routes (batch size, eager vs compiled).
SCORE_RTOL = 1e-5
SCORE_ATOL = 1e-6
#: float64 pure-NumPy identities.
EXACT_ATOL = 1e-10
#: Weights of the user's model after collection must be bit-identical.
WEIGHTS_ATOL = 0.0
#: Detection quality bar on digits with tiny settings.
MIN_DIGITS_AUC = 0.97
#: float32 probabilities computed by two routes (compiled mean vs eager).
PROB_ATOL = 1e-5
#: Scores on any number of replicas vs one device (float32, the issue's bound).
DIST_SCORE_ATOL = 1e-5
#: Data-parallel members vs sequential ones: same SGD, gradients summed in another order.
DATA_PARALLEL_ATOL = 1e-5
#: One-member-per-replica members vs sequential ones: the same computation.
PER_REPLICA_ATOL = 1e-6
#: Fine-tuning compiled with XLA vs without: the same SGD, fused float32 arithmetic.
XLA_WEIGHTS_ATOL = 1e-5
