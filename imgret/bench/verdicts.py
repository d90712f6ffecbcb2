"""The targets, and the verdict of a figure against its target: met, or by how much it is missed, and when a
ratio cannot be (beyond its rounds' spread)."""
from __future__ import annotations


TARGETS = {  # the targets: (comparison, bound)
    "extract_vs_forward": (">=", 0.95),
    "extract_vs_seed_loop_64px": (">=", 3.0),
    "clip_extract_vs_matmul_peak": (">=", 0.6),
    "brute_vs_matmul_peak": (">=", 0.5),
    "brute_vs_faiss_flat": (">=", 3.0),
    "single_query_vs_bandwidth_limit": ("<=", 1.3),
    "ivf_harness_overhead": ("<=", 0.05),
    "filtered_vs_unfiltered": ("<=", 1.0),  # an exact filtered search against the unfiltered exact scan
    "extract_peak_rss_gb": ("<=", 3.0),
}

# Ratios that cannot exceed 1 (a part of a task is not slower than the whole task): above it, the benchmark is wrong.
AT_MOST_ONE = {"extract_vs_forward": "end to end cannot be faster than its own forward pass"}

# Ratios to a physical limit that cannot go below 1 unless the limit does not apply.
AT_LEAST_ONE = {"single_query_vs_bandwidth_limit": "faster than reading the gallery from memory: it came from the "
                                                    "CPU caches, so this gallery is too small for the bound"}

def verdict(name: str, value: float, rounds: tuple[float, float] | None = None) -> str:
    """Whether `value` (a median) meets its target, by how much it misses, and whether the target lies within the
    rounds' spread (min, max), where another run may land on its other side. A ratio bounded by 1 is impossible
    when even its most favourable round lies past 1: the tolerance is the rounds' own spread, not a constant."""
    comparison, bound = TARGETS[name]
    low, high = rounds if rounds is not None else (value, value)
    if name in AT_MOST_ONE and low > 1.0:
        return f"IMPOSSIBLE ({value:.2f}x, every round above 1: {AT_MOST_ONE[name]}): a measurement error, not met"
    if name in AT_LEAST_ONE and high < 1.0:
        return f"NOT A MEASURE OF THE BOUND ({value:.2f}x, every round below 1: {AT_LEAST_ONE[name]})"
    met = value >= bound if comparison == ">=" else value <= bound
    if met:
        said = f"met (target {comparison} {bound:g})"
    else:
        short = bound / value - 1 if comparison == ">=" else value / bound - 1
        said = f"MISSED: target {comparison} {bound:g}, {short:.1%} short"
    if rounds is not None and min(rounds) <= bound <= max(rounds):
        said += f"; the target is within the rounds' {min(rounds):.2f}-{max(rounds):.2f}"
    return said
