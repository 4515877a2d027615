"""Outputs of a run: results.json, results.csv, the AFID@k plot, sample grids, report.md and the console
table. Everything is written atomically (temporary file + os.replace) by rank 0 only."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import List, Optional

import torch

from .checkpoint import atomic_write_text


def _fmt(v, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def save_sample_grid(x: torch.Tensor, y: torch.Tensor, path: Path, per_class: int = 8) -> None:
    """One row per class (the first `per_class` samples of it), images in [-1, 1] -> PNG."""
    from PIL import Image

    rows = []
    for c in torch.unique(y, sorted=True).tolist():
        xc = x[y == c][:per_class]
        if xc.shape[0] < per_class:
            xc = torch.cat([xc, -torch.ones((per_class - xc.shape[0],) + tuple(xc.shape[1:]))])
        rows.append(xc)
    grid = torch.stack(rows)  # [R, P, C, H, W]
    r, p, c, h, w = grid.shape
    pad = 1
    canvas = torch.ones(c, r * (h + pad) + pad, p * (w + pad) + pad)
    for i in range(r):
        for j in range(p):
            canvas[:, pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = grid[i, j]
    img = ((canvas.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = img[0].numpy() if c == 1 else img.permute(1, 2, 0).numpy()
    scale = max(1, 128 // max(h, 1))
    im = Image.fromarray(arr)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    tmp.replace(path)


def plot_afid(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = payload["metric"]["fid"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in payload["methods"].items():
        a = r["afid_at_k"]
        ax.plot(range(1, len(a) + 1), a, marker="o", label=name)
    ax.set_xticks(range(1, len(payload["data"]["tasks"]) + 1))
    ax.set_xlabel("task k")
    ax.set_ylabel(f"AFID@k ({label})")
    ax.set_title(f"{payload['preset']} ({payload['scale']} scale, data: {payload['data']['used']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def summary_rows(payload: dict) -> List[dict]:
    rows = []
    for name, r in payload["methods"].items():
        rows.append({"method": name, "fid_kind": payload["metric"]["fid"], "mf_afid_final": r["mf"],
                     "forgetting": r["forgetting"], "imf": r["imf"], "kld": r["kld"],
                     "train_s": r["train_s"], "total_s": r["total_s"]})
    return rows


def results_table(payload: dict) -> str:
    label = payload["metric"]["fid"]
    head = f"| method | MF = AFID@T ({label}) | forgetting F | IMF | KLD | train s | total s |"
    lines = [head, "|" + "---|" * 7]
    for r in summary_rows(payload):
        lines.append(f"| {r['method']} | {_fmt(r['mf_afid_final'])} | {_fmt(r['forgetting'])} | {_fmt(r['imf'])} | "
                     f"{_fmt(r['kld'], 3)} | {_fmt(r['train_s'], 1)} | {_fmt(r['total_s'], 1)} |")
    return "\n".join(lines)


def paper_table(payload: dict) -> Optional[str]:
    paper = payload["paper"]["values"]
    if not paper:
        return None
    metrics = sorted({m for v in paper.values() for m in v}, key=["afid", "mf", "forgetting", "imf", "kld"].index)
    ours_key = {"afid": "mf", "mf": "mf", "forgetting": "forgetting", "imf": "imf", "kld": "kld"}
    head = "| method | " + " | ".join(f"paper {m} | ours {m}" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(metrics))]
    for name in sorted(set(paper) | set(payload["methods"]), key=lambda n: (n not in payload["methods"], n)):
        cells = [name]
        for m in metrics:
            cells.append(_fmt(paper.get(name, {}).get(m)))
            ours = payload["methods"].get(name, {}).get(ours_key[m])
            cells.append(_fmt(ours, 3 if m == "kld" else 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(payload: dict) -> str:
    label = payload["metric"]["fid"]
    d = payload["data"]
    out = [f"# cdgfast.train: {payload['preset']} ({payload['scale']} scale)", "",
           payload["description"], "",
           f"- data: {d['source']}; train {d['num_train']}, eval {d['num_eval']} images, "
           f"{d['channels']}x{d['image_size']}x{d['image_size']}, tasks {d['tasks']}"]
    for s in d["substitutions"]:
        out.append(f"- **substitution**: {s}")
    out += [f"- FID: **{label}**, {payload['metric']['fid_samples_per_class']} class-balanced DDIM samples per class "
            f"({payload['metric']['ddim_steps']} steps) against {payload['metric']['fid_reference']}",
            *(["- hyperparameters changed with --set: " + ", ".join(
                f"{m}.{k}={v}" for m, kv in payload["config"]["method_args"].items() for k, v in kv.items())]
              if payload.get("config", {}).get("method_args") else []),
            *(["- results kept from earlier sessions of this run (not run in this one): "
               + ", ".join(payload["kept_from_earlier_sessions"])] if payload.get("kept_from_earlier_sessions") else []),
            f"- world size {payload['world_size']}, device {payload['device']}, torch {payload['versions']['torch']}",
            f"- time this session: {payload['timings']['wall_s_this_session']:.1f} s wall, "
            f"{payload['timings'].get('cpu_s_this_session', float('nan')):.1f} s CPU "
            f"({payload['timings'].get('torch_threads', '?')} torch threads)", ""]
    if label != "Inception-FID":
        out += ["> classifier-FID is the Fréchet distance on the features of a small CNN classifier trained on this "
                "data set (Inception weights were not given). It ranks methods on the same run but its scale is NOT "
                "comparable with the papers' Inception FIDs below.", ""]
    out += ["## Results", "", results_table(payload), "", "## AFID@k", "",
            "| method | " + " | ".join(f"k={i + 1}" for i in range(len(d["tasks"]))) + " |",
            "|" + "---|" * (1 + len(d["tasks"]))]
    for name, r in payload["methods"].items():
        out.append(f"| {name} | " + " | ".join(_fmt(v) for v in r["afid_at_k"]) + " |")
    out += ["", "![AFID@k](afid.png)", "", "## FID matrix (row k: after task k; column i: task i)", ""]
    for name, r in payload["methods"].items():
        out += [f"**{name}**", "", "```"]
        for row in r["fid"]:
            out.append("  ".join(f"{_fmt(v):>8}" for v in row))
        out += ["```", ""]
    pt = paper_table(payload)
    out += ["## Beside the paper", ""]
    if pt:
        out += [f"Source: {payload['paper']['source']}.", "",
                "Paper AFID / MF are the average FID after the last task, as our MF column.", "", pt, ""]
        if label != "Inception-FID" or payload["scale"] != "paper" or d["substitutions"]:
            out += ["These runs differ from the paper's setting (scale, data or FID features): compare the ordering of "
                    "methods, not the values.", ""]
    else:
        out += ["The paper has no numbers for this preset.", ""]
    out += ["Samples: `samples/<method>_task<k>.png` (one row per class seen so far)."]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, payload: dict, log=print) -> None:
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str, allow_nan=False)
                      if _finite(payload) else json.dumps(_clean(payload), indent=1, default=str))
    buf = io.StringIO()
    rows = summary_rows(payload)
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()) if rows else ["method"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "results.csv", buf.getvalue())
    try:
        plot_afid(payload, out / "afid.png")
    except Exception as exc:  # a plotting problem must not lose the numbers
        log(f"warning: could not draw afid.png ({type(exc).__name__}: {exc})")
    atomic_write_text(out / "report.md", report_markdown(payload))
    log("\n" + results_table(payload) + "\n")
    if payload["data"]["substitutions"]:
        log("data substitutions: " + "; ".join(payload["data"]["substitutions"]))


def _finite(obj) -> bool:
    try:
        json.dumps(obj, allow_nan=False, default=str)
        return True
    except ValueError:
        return False


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------------------- --seeds
def _pm(stat: dict, digits: int = 2) -> str:
    """"mean ± s.e." of a mean_se entry ("mean" alone for one seed)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if stat.get("se") is None:
        return _fmt(stat["mean"], digits)
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def seeds_table(payload: dict) -> str:
    """Per method: MF, forgetting, IMF, KLD and the classifier's accuracy on the final task's samples,
    each as mean ± standard error over the seeds."""
    label = payload["metric"]["fid"]
    n = len(payload["seeds"])
    lines = [f"| method | MF ({label}) | forgetting F | IMF | KLD | acc. on samples (final) | seeds |",
             "|" + "---|" * 7]
    for name, m in payload["methods"].items():
        lines.append(f"| {name} | {_pm(m['mf'])} | {_pm(m['forgetting'])} | {_pm(m['imf'])} | {_pm(m['kld'], 3)} | "
                     f"{_pm(m['final_accuracy_on_samples'], 3)} | {m['mf']['n']} of {n} |")
    return "\n".join(lines)


def seeds_comparisons(payload: dict) -> List[str]:
    """One line per pair of methods: their MF gap against the combined standard error."""
    out = []
    for c in payload["comparisons"]:
        if c["combined_se"] is None:
            out.append(f"- {c['a']} vs {c['b']}: MF gap {c['mf_gap_b_minus_a']:+.2f} (one seed: no error to compare)")
            continue
        verdict = ("exceeds twice the combined error" if c["exceeds_2x_error"] else
                   "exceeds the combined error (but not twice it)" if c["exceeds_error"] else
                   "is LESS than the combined error: not a difference these seeds can show")
        out.append(f"- {c['a']} vs {c['b']}: MF({c['b']}) - MF({c['a']}) = {c['mf_gap_b_minus_a']:+.2f}, combined "
                   f"s.e. {c['combined_se']:.2f}: the gap {verdict}")
    return out


def seeds_report_markdown(payload: dict) -> str:
    p = payload.get("protocol") or {}
    d = payload["data"]
    out = [f"# cdgfast.train: {payload['preset']} ({payload['scale']} scale), seeds {payload['seeds']}", "",
           payload["description"], "",
           f"- data: {d['source']}; train {d['num_train']}, eval {d['num_eval']} images, tasks {d['tasks']}",
           f"- FID: **{payload['metric']['fid']}**, {payload['metric']['fid_samples_per_class']} DDIM samples per class "
           f"({payload['metric']['ddim_steps']} steps)",
           f"- ruler: feature network sha256 {str(p.get('feature_network_sha256'))[:16]}, classifier held-out accuracy "
           f"{_fmt(p.get('classifier_eval_accuracy'), 4)}, evaluation split sha256 {str(p.get('eval_split_sha256'))[:16]}",
           "- each seed is a complete run in `seed-<s>/` (its own report.md, samples and checkpoints)", ""]
    if not payload["protocol_consistent"]:
        out += ["> **WARNING: the seeds were measured with different evaluation protocols**; their numbers are not "
                "comparable: " + "; ".join(payload["protocol_differences"]), ""]
    out += ["## Mean ± standard error over the seeds", "", seeds_table(payload), "",
            "Standard error = sample standard deviation / sqrt(number of seeds).", "",
            "## Which gaps the errors allow", "", *seeds_comparisons(payload), "",
            "## Per seed (MF)", "",
            "| method | " + " | ".join(f"seed {s}" for s in payload["seeds"]) + " |",
            "|" + "---|" * (1 + len(payload["seeds"]))]
    for name, m in payload["methods"].items():
        out.append(f"| {name} | " + " | ".join(_fmt(v) for v in m["mf"]["values"]) + " |")
    return "\n".join(out) + "\n"


def write_seeds_outputs(out: Path, payload: dict, log=print) -> None:
    out = Path(out)
    atomic_write_text(out / "results.json", json.dumps(payload, indent=1, default=str, allow_nan=False)
                      if _finite(payload) else json.dumps(_clean(payload), indent=1, default=str))
    atomic_write_text(out / "report.md", seeds_report_markdown(payload))
    log("\n" + seeds_table(payload) + "\n" + "\n".join(seeds_comparisons(payload)) + "\n")
    if not payload["protocol_consistent"]:
        log("WARNING: the seeds were measured with different evaluation protocols: "
            + "; ".join(payload["protocol_differences"]))
