"""Timing helpers shared by the benchmarks in bench/: interleaved repetitions, medians,
and a description of the machine.

`alternate(functions, warmup, repeats)` calls every function once per round, in the
given order (A B C A B C ...), `warmup` untimed rounds first, so that load changes on a
shared machine hit all candidates alike. Each function must block until its result is
computed (e.g. end with `.numpy()`); the wall time of each call is recorded.

`chained(step)` makes a tf.function that runs `step` on N inputs one after the other, for
timing an op per call of a graph (the dispatch of a tf.function call amortised over N).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Mapping, Optional

from absl import logging


def lscpu_fields() -> Dict[str, str]:
    """`lscpu`'s "Key: value" lines as a dict ({} where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, object]:
    """CPU model, core counts, load average and software versions of this machine."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    cpu = lscpu_fields()
    cores = None
    if cpu.get("Core(s) per socket", "").isdigit() and cpu.get("Socket(s)", "").isdigit():
        cores = int(cpu["Core(s) per socket"]) * int(cpu["Socket(s)"])
    flags = cpu.get("Flags", "").split()
    return {
        "cpu_model": cpu.get("Model name") or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "physical_cores": cores,
        "cpu_flags": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
                                  "amx_tile") if f in flags],
        "hypervisor": cpu.get("Hypervisor vendor"),
        "load_average": load_average(),
        "tensorflow": tf.__version__,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86)"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
    }


def alternate(functions: Mapping[str, Callable[[], object]], warmup: int, repeats: int,
              label: str = "", cpu_times: Optional[Dict[str, List[float]]] = None
              ) -> Dict[str, List[float]]:
    """Seconds per call of each function over `repeats` interleaved rounds.

    Round r calls the functions in mapping order; the first `warmup` rounds are not
    recorded. Returns {name: [wall seconds of round 1, ..., round `repeats`]}. When a
    `cpu_times` dict is passed, it is filled the same way with the process CPU seconds
    (all threads) of each call, which other processes on a shared machine disturb less
    than wall time.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    times: Dict[str, List[float]] = {name: [] for name in functions}
    cpu: Dict[str, List[float]] = {name: [] for name in functions}
    for round_index in range(warmup + repeats):
        this_round, this_round_cpu = {}, {}
        for name, function in functions.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            function()
            this_round[name] = time.perf_counter() - start
            this_round_cpu[name] = time.process_time() - start_cpu
        if round_index >= warmup:
            for name, seconds in this_round.items():
                times[name].append(seconds)
                cpu[name].append(this_round_cpu[name])
        logging.info("%s round %d/%d (%s): %s", label, round_index + 1, warmup + repeats,
                     "timed" if round_index >= warmup else "warm-up",
                     ", ".join(f"{name} {seconds:.3f}s" for name, seconds in this_round.items()))
    if cpu_times is not None:
        cpu_times.update(cpu)
    return times


def chained(step: Callable) -> Callable:
    """A tf.function mapping a list of inputs to the list of `step(input)` outputs.

    The calls run one after the other: the ops of each wait (control dependencies) for
    all outputs of the previous one, so independent calls cannot overlap on
    TensorFlow's inter-op thread pool, as the N ops of an amortised timing must not.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    @tf.function
    def run(inputs):
        outputs = []
        for element in inputs:
            with tf.control_dependencies(tf.nest.flatten(outputs[-1:])):
                outputs.append(step(element))
        return outputs

    return run


def summarize(samples: List[float]) -> Dict[str, float]:
    """Median, min, max and count of a list of seconds."""
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "n": len(samples)}
