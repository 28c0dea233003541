"""`--plot FILE.png`: latency distributions and output throughput over time of one serving run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.metrics import RequestRecord, output_throughput_over_time

NUM_TIME_BUCKETS = 40
MIN_BUCKET_S = 0.05


def write_plot(path: str | Path, records: Sequence[RequestRecord], title: str) -> Path:
    """Draws TTFT, ITL and end-to-end latency histograms and tokens/s per second into a PNG.

    matplotlib is optional for pagewire; raises ValueError saying how to install it when it is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError(f"--plot needs matplotlib: pip install matplotlib ({error})") from error

    done = [r for r in records if r.is_success]
    panels = (
        ("TTFT (ms)", [1e3 * t for r in done if (t := r.ttft) is not None]),
        ("Inter-token latency (ms)", [1e3 * gap for r in done for gap in r.itls]),
        ("End-to-end latency (ms)", [1e3 * r.e2e_latency for r in done]),
    )
    figure, axes = plt.subplots(2, 2, figsize=(11, 7))
    for axis, (label, values) in zip(axes.flat, panels):
        axis.hist(values, bins=40, color="#4472c4")
        axis.set_xlabel(label)
        axis.set_ylabel("count")
    end = max((r.end_time for r in done), default=0.0)
    over_time = output_throughput_over_time(done, bucket_s=max(end / NUM_TIME_BUCKETS, MIN_BUCKET_S))
    throughput_axis = axes.flat[3]
    throughput_axis.step(
        [t for t, _ in over_time], [rate for _, rate in over_time], where="post", color="#c00000"
    )
    throughput_axis.set_xlabel("time since start (s)")
    throughput_axis.set_ylabel("output tokens/s")
    figure.suptitle(title)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
