"""All benchmarks of docs/benchmarks.md in one process: JSON, a Markdown table and a plot.

  python bench/run_all.py [--output_dir=docs/benchmarks] [--depth=101]
      [--sizes=600x1000,800x1333] [--train_sizes=600x1000] [--warmup=1] [--repeats=5]
      [--train_warmup=1] [--train_repeats=3] [--profile_sizes=600x1000] [--profile_repeats=3]
      [--flavours=custom,portable,saved_model,tflite] [--accuracy_steps=0]
      [--accuracy_results=equal_budget.json]

Measurements, in this order:
 1. inference latency (bench/detectors.py): per size, R-FCN's flavours and official.vision's
    Faster R-CNN interleaved, together with the matmul and conv rate probes of
    bench/machine_limit.py, so the rates are measured under the same load;
 2. the physical limit: FLOPs of both models at each size; percent of limit =
    (FLOPs / best probe rate) / median latency;
 3. the stage profile of one inference (bench/profile_inference.py) at each of
    --profile_sizes, with the NMS alternatives;
 4. the training step time (bench/detectors.py) at each training size;
 5. optionally (--accuracy_steps > 0) accuracy at equal budget (bench/equal_budget.py),
    or (--accuracy_results) the JSON of an earlier `bench/equal_budget.py --output` run,
    included as it is with its path: that training takes hours for a meaningful budget.
Writes <output_dir>/results.json, results.md and latency.png. Every median is over the
timed rounds; min and max are in the JSON.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rfcn_tf  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import
from absl import app, flags, logging  # noqa: E402

from bench import detectors, equal_budget, machine_limit  # noqa: E402
from bench import profile_inference, timing  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "docs/benchmarks", "Where results.json/.md and the plot go.")
flags.DEFINE_integer("profile_repeats", 3, "Timed rounds of the stage profile.")
flags.DEFINE_string("profile_sizes", "600x1000", "Sizes HxW of the stage profile ('' skips).")
flags.DEFINE_string("accuracy_results", None, "Include this `bench/equal_budget.py --output` "
                    "JSON as the accuracy at equal budget (instead of --accuracy_steps).")

LABELS = {"rfcn_custom": "R-FCN (custom op)", "rfcn_portable": "R-FCN (portable)",
          "rfcn_saved_model": "R-FCN SavedModel", "rfcn_tflite": "R-FCN TFLite fp32",
          "faster_rcnn": "Faster R-CNN (official.vision)"}


def measure_inference(size, rfcn, faster, flavours, work_dir) -> Dict[str, object]:
    """Interleaved latencies of every candidate and rate probe at one size, FLOPs and
    percent of the limit."""
    candidates = detectors.inference_candidates(size, rfcn, faster, flavours, work_dir)
    probes = {"matmul_probe": machine_limit.matmul_probe(),
              "conv_probe": machine_limit.conv_probe()}
    functions = {k: c.run for k, c in candidates.items()}
    functions.update({k: run for k, (run, _) in probes.items()})
    times = timing.alternate(functions, FLAGS.warmup, FLAGS.repeats,
                             label=f"inference {detectors.size_name(size)}")
    rates = {k: flops / timing.summarize(times[k])["median_s"] for k, (_, flops) in probes.items()}
    best_rates = {k: flops / min(times[k]) for k, (_, flops) in probes.items()}
    limit = max(best_rates.values())  # the best sustained rate this run observed
    flops = {model: machine_limit.count_flops(candidates[name].concrete, model)
             for model, name in (("rfcn", next(k for k in candidates if k.startswith("rfcn_")
                                                and candidates[k].concrete is not None)),
                                 ("faster_rcnn", "faster_rcnn"))}
    latency = {}
    for name, candidate in candidates.items():
        summary = timing.summarize(times[name])
        summary["percent_of_limit"] = machine_limit.percent_of_limit(
            flops[candidate.model]["total"], summary["median_s"], limit)
        summary["percent_of_limit_best"] = machine_limit.percent_of_limit(
            flops[candidate.model]["total"], summary["min_s"], limit)
        latency[name] = summary
    base = latency["faster_rcnn"]["median_s"]
    for summary in latency.values():
        summary["ratio_to_faster_rcnn"] = summary["median_s"] / base
    return {"latency": latency, "rates_flops_per_s": rates, "best_rates_flops_per_s": best_rates,
            "limit_flops_per_s": limit,
            "flops": flops,
            "padded_input": {"rfcn": list(detectors.model_inputs(size, detectors.RFCN_PAD)[
                                 "images"].shape[1:3]),
                             "faster_rcnn": list(detectors.model_inputs(
                                 size, detectors.FASTER_PAD)["images"].shape[1:3])}}


def measure_training(size, rfcn, faster, experiment) -> Dict[str, object]:
    steps = {"rfcn": detectors.rfcn_train_callable(rfcn, size, FLAGS.learning_rate),
             "faster_rcnn": detectors.faster_train_callable(
                 faster, experiment, size, FLAGS.num_classes, FLAGS.learning_rate)}
    last = {}

    def keep_last(name):
        def run():
            last[name] = steps[name]()
        return run

    times = timing.alternate({k: keep_last(k) for k in steps}, FLAGS.train_warmup,
                             FLAGS.train_repeats, label=f"training {detectors.size_name(size)}")
    result = {k: timing.summarize(v) for k, v in times.items()}
    for name in steps:
        result[name]["last_loss"] = float(last[name]["loss"])
        result[name]["ratio_to_faster_rcnn"] = (result[name]["median_s"]
                                                / result["faster_rcnn"]["median_s"])
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f}"


def markdown(results: Dict[str, object]) -> str:
    """The tables of docs/benchmarks.md from a results dict."""
    machine, settings = results["machine"], results["settings"]
    lines = [f"Machine: {machine['cpu_model']}, {machine['physical_cores']} cores "
             f"({machine['logical_cpus']} logical CPUs), TensorFlow {machine['tensorflow']}; "
             f"load average {machine['load_average']} at the start, "
             f"{results['load_average_end']} at the end. ResNet-{settings['depth']} backbones, "
             f"{settings['num_classes']} classes, {settings['num_proposals']} test proposals, "
             f"random weights, batch 1, fp32.", ""]
    lines += ["### Inference latency (median ms)", ""]
    names = [n for n in LABELS if any(n in r["latency"] for r in results["inference"].values())]
    lines.append("| input | " + " | ".join(LABELS[n] for n in names)
                 + " | R-FCN / Faster R-CNN | GFLOPs R-FCN / Faster | "
                 "% of limit: R-FCN median (best), Faster median | "
                 "probe GFLOP/s median (best): matmul, conv |")
    lines.append("|---" * (len(names) + 5) + "|")
    for size, entry in results["inference"].items():
        lat = entry["latency"]
        ref = lat["rfcn_custom"] if "rfcn_custom" in lat else next(
            lat[n] for n in lat if n.startswith("rfcn_"))
        cells = [_ms(lat[n]["median_s"]) if n in lat else "n/m" for n in names]
        rates, best_rates = entry["rates_flops_per_s"], entry["best_rates_flops_per_s"]
        lines.append(
            f"| {size} | " + " | ".join(cells)
            + f" | {ref['ratio_to_faster_rcnn']:.2f}"
            + f" | {entry['flops']['rfcn']['total'] / 1e9:.0f} / "
              f"{entry['flops']['faster_rcnn']['total'] / 1e9:.0f}"
            + f" | {ref['percent_of_limit']:.0f}% ({ref['percent_of_limit_best']:.0f}%), "
              f"{lat['faster_rcnn']['percent_of_limit']:.0f}%"
            + f" | {rates['matmul_probe'] / 1e9:.0f} ({best_rates['matmul_probe'] / 1e9:.0f}), "
              f"{rates['conv_probe'] / 1e9:.0f} ({best_rates['conv_probe'] / 1e9:.0f}) |")
    lines += ["", f"{settings['repeats']} timed rounds after {settings['warmup']} warm-up "
              "round(s), candidates and rate probes interleaved. Ratio and % of limit use "
              "R-FCN with the custom op. Limit = the best probe rate of the run; % of limit "
              "= (GFLOPs / limit) / latency, median latency (best: minimum latency). "
              "n/m: not measured.", ""]
    if results["training"]:
        lines += ["### Training step (median ms, SGD, batch 1)", "",
                  "| input | R-FCN | Faster R-CNN | R-FCN / Faster R-CNN |", "|---|---|---|---|"]
        for size, entry in results["training"].items():
            lines.append(f"| {size} | {_ms(entry['rfcn']['median_s'])} | "
                         f"{_ms(entry['faster_rcnn']['median_s'])} | "
                         f"{entry['rfcn']['ratio_to_faster_rcnn']:.2f} |")
        lines += ["", f"{settings['train_repeats']} timed rounds after "
                  f"{settings['train_warmup']} warm-up rounds.", ""]
    if results["profile"]:
        lines += ["### Where the time goes (stages timed separately)", ""]
    for size, entry in results["profile"].items():
        for model, breakdown in entry.items():
            lines += [profile_inference.format_breakdown(f"{model} {size}", breakdown), ""]
    if results.get("accuracy"):
        acc = results["accuracy"]
        source = f" (from {acc['source']})" if acc.get("source") else ""
        lines += [f"### Accuracy at equal budget (BCCD test, VOC07 mAP@0.5){source}", "",
                  "| model | steps | mAP@0.5 | train s/step |", "|---|---|---|---|"]
        for model, entry in acc["models"].items():
            lines.append(f"| {model} | {acc['steps']} | {entry['mAP@0.5']:.3f} | "
                         f"{entry['seconds_per_step']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: Dict[str, object], path: str) -> bool:
    """Bar charts of the inference latencies (with R-FCN's compute limit) and training
    steps; returns False (and logs why) when matplotlib is missing."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    panels = 2 if results["training"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    sizes = list(results["inference"])
    names = [n for n in LABELS if any(n in results["inference"][s]["latency"] for s in sizes)]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["inference"][s]["latency"].get(name, {}).get("median_s", 0)
                  for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], values, width, label=LABELS[name])
    for j, size in enumerate(sizes):
        entry = results["inference"][size]
        floor = entry["flops"]["rfcn"]["total"] / entry["limit_flops_per_s"]
        ax.hlines(floor, j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--",
                  label="R-FCN FLOPs / measured limit" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title(f"Inference, ResNet-{results['settings']['depth']}, batch 1")
    ax.legend(fontsize=7)
    if results["training"]:
        ax = axes[0][1]
        tsizes = list(results["training"])
        for i, (name, label) in enumerate((("rfcn", "R-FCN"), ("faster_rcnn", "Faster R-CNN"))):
            ax.bar([j + i * 0.4 for j in range(len(tsizes))],
                   [results["training"][s][name]["median_s"] for s in tsizes], 0.4, label=label)
        ax.set_xticks([j + 0.2 for j in range(len(tsizes))], tsizes)
        ax.set_ylabel("seconds per SGD step (median)")
        ax.set_title("Training step, batch 1")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['machine']['cpu_model']}, {results['machine']['physical_cores']} "
                 f"cores, load {results['machine']['load_average'][0]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


ACCURACY_KEYS = ("mAP@0.5", "seconds_per_step")  # per model, as markdown() reads them


def _is_number(value) -> bool:
    """True for an int or float (JSON number), False for bool and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def load_accuracy_results(path: str) -> Dict[str, object]:
    """The `bench/equal_budget.py --output` JSON at `path` with "source": path added.

    Raises app.UsageError naming `path` and the problem when the file cannot be read, is not
    JSON, or lacks what markdown() reads: a top-level object with a number "steps" and a
    non-empty object "models" whose every value is an object with numbers "mAP@0.5" and
    "seconds_per_step"."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise app.UsageError(f"--accuracy_results={path}: cannot read it: {e.strerror}") from None
    except ValueError as e:
        raise app.UsageError(f"--accuracy_results={path} is not valid JSON: {e}") from None
    problem = _accuracy_problem(data)
    if problem:
        raise app.UsageError(f"--accuracy_results={path} is not a bench/equal_budget.py "
                             f"--output JSON: {problem}")
    return {**data, "source": path}


def _accuracy_problem(data) -> str:
    """What in `data` markdown()'s accuracy table cannot use ('' when nothing)."""
    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    problem = _number_problem(data, "steps")
    if problem:
        return problem
    if "models" not in data:
        return f"'models' is missing (keys there: {sorted(data)})"
    models = data["models"]
    if not isinstance(models, dict) or not models:
        return f"'models' must be a non-empty object, got {models!r}"
    for model, entry in models.items():
        if not isinstance(entry, dict):
            return f"models[{model!r}] must be an object, got {entry!r}"
        for key in ACCURACY_KEYS:
            problem = _number_problem(entry, key, f"models[{model!r}]")
            if problem:
                return problem
    return ""


def _number_problem(mapping: Dict[str, object], key: str, where: str = "") -> str:
    """Why mapping[key] is not a number ('' when it is); `where` is mapping's path in the
    file ('' for the top level)."""
    name = f"{where}[{key!r}]" if where else repr(key)
    if key not in mapping:
        return f"{name} is missing (keys there: {sorted(mapping)})"
    if not _is_number(mapping[key]):
        return f"{name} must be a number, got {mapping[key]!r}"
    return ""


def parse_size_flags() -> Tuple[List[Tuple[int, int]], ...]:
    """(sizes, profile_sizes, train_sizes) from their flags; app.UsageError for a malformed
    size or an empty --sizes (the inference latency is what every table and the plot show;
    --profile_sizes and --train_sizes may be empty: that part is skipped)."""
    parsed = []
    for name in ("sizes", "profile_sizes", "train_sizes"):
        try:
            parsed.append(detectors.parse_sizes(FLAGS[name].value))
        except ValueError as e:
            raise app.UsageError(f"--{name}: {e}") from None
    if not parsed[0]:
        raise app.UsageError(f"--sizes must name at least one size HxW, got {FLAGS.sizes!r}")
    return tuple(parsed)


def main(argv):
    del argv
    if FLAGS.accuracy_steps > 0 and FLAGS.accuracy_results:
        raise app.UsageError("give --accuracy_steps or --accuracy_results, not both")
    # Every flag is checked here: a bad one fails now, not after minutes of timings.
    accuracy = (load_accuracy_results(FLAGS.accuracy_results) if FLAGS.accuracy_results
                else None)
    sizes, profile_sizes, train_sizes = parse_size_flags()
    try:
        flavours = detectors.parse_flavours(FLAGS.flavours)
        if FLAGS.accuracy_steps > 0:
            equal_budget.bccd_root()  # the dataset equal_budget.run trains on
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    started = time.time()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="rfcn_bench_")
    results = {"machine": timing.machine_info(),
               "command": " ".join(["python"] + sys.argv),
               "settings": {k: FLAGS[k].value for k in (
                   "depth", "num_classes", "num_proposals", "sizes", "train_sizes", "flavours",
                   "warmup", "repeats", "train_warmup", "train_repeats", "profile_sizes",
                   "profile_repeats",
                   "rfcn_freeze_at", "rfcn_frozen_batch_norm", "accuracy_steps")},
               "inference": {}, "profile": {}, "training": {}}
    rfcn = detectors.build_rfcn(FLAGS.depth, FLAGS.num_classes, FLAGS.num_proposals,
                                FLAGS.rfcn_freeze_at, FLAGS.rfcn_frozen_batch_norm)
    experiment = detectors.faster_rcnn_experiment(FLAGS.depth, FLAGS.num_classes,
                                                  FLAGS.num_proposals)
    faster = detectors.build_faster_rcnn(experiment)
    for size in sizes:
        results["inference"][detectors.size_name(size)] = measure_inference(
            size, rfcn, faster, flavours, work_dir)
    for size in profile_sizes:
        results["profile"][detectors.size_name(size)] = profile_inference.profile_size(
            size, rfcn, faster, warmup=1, repeats=FLAGS.profile_repeats)
    for size in train_sizes:
        results["training"][detectors.size_name(size)] = measure_training(
            size, rfcn, faster, experiment)
    if accuracy:
        results["accuracy"] = accuracy
    if FLAGS.accuracy_steps > 0:
        results["accuracy"] = equal_budget.run(FLAGS.accuracy_steps)
    results["load_average_end"] = timing.load_average()
    results["wall_minutes"] = (time.time() - started) / 60.0
    json_path = os.path.join(FLAGS.output_dir, "results.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    md_path = os.path.join(FLAGS.output_dir, "results.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(table + "\n")
    png_path = os.path.join(FLAGS.output_dir, "latency.png")
    wrote_plot = plot(results, png_path)
    print(table)
    print(f"\nwrote {json_path}, {md_path}" + (f", {png_path}" if wrote_plot else "")
          + f" in {results['wall_minutes']:.1f} min")


if __name__ == "__main__":
    app.run(main)
