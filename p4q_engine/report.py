"""Result tables in the layout of the paper's Table 1, written as JSON (for machines) and Markdown (for people)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from p4q_engine.ptq import PTQSettings, environment, run_ptq, settings_dict

#: Row labels of Table 1 per observer.
METHOD_LABELS = {
    "minmax": "MinMax",
    "ema": "EMA (Jacob et al., 2018)",
    "percentile": "Percentile (Li et al., 2019)",
    "omse": "Baseline: OMSE (Choukroun et al., 2019)",
}


def _cell(rows: list[dict], bits: str, scope: str, observer: str, key: str) -> str:
    for r in rows:
        if r["bits"] == bits and r["scope"] == scope and r["observer"] == observer:
            return f"{r[key]:.2f}"
    return "-"


def ptq_markdown(result: dict) -> str:
    """Table 1 (PTQ rows): one line per (bits, observer), Top-1/Top-5 per scope."""
    scopes, rows, fp = result["scopes"], result["rows"], result["fp32"]
    head = "| Method | #Bits (W-A-Attn) | " + " | ".join(f"{s} Top-1 | {s} Top-5" for s in scopes) + " |"
    lines = [
        f"# PTQ on {result['dataset']} ({result['model']})",
        "",
        f"Produced by `{result['command']}` on {result['date']} ({result['env']['device']}, torch "
        f"{result['env']['torch']}, open_clip {result['env']['open_clip']}).",
        "",
        f"Evaluated on {fp['n']} images; calibration: {result['settings']['calib_batches']} batches of "
        f"{result['settings']['batch_size']} images plus every class prompt.",
        "",
        head,
        "|" + "---|" * (2 + 2 * len(scopes)),
        "| Zero-shot CLIP (full precision) | 32-32-32 | "
        + " | ".join(f"{fp['top1']:.2f} | {fp['top5']:.2f}" for _ in scopes)
        + " |",
    ]
    for bits in result["bits"]:
        for obs in result["observers"]:
            cells = " | ".join(
                f"{_cell(rows, bits, s, obs, 'top1')} | {_cell(rows, bits, s, obs, 'top5')}" for s in scopes
            )
            lines.append(f"| {METHOD_LABELS.get(obs, obs)} | {bits} | {cells} |")
    return "\n".join(lines) + "\n"


def ptq_table(args, settings: PTQSettings, loaded, data_fn: Callable) -> dict:
    """Run every (bits, observer, scope) PTQ on one dataset and write ``<out>.json`` and ``<out>.md``."""
    from p4q_engine.clip.recipe import QuantRecipe

    calib = data_fn(args, loaded.preprocess, "calib")
    test = data_fn(args, loaded.preprocess, "test", args.eval_size)
    quiet = PTQSettings(**{**settings.__dict__, "progress": False})
    fp = run_ptq(loaded.model, loaded.tokenizer, QuantRecipe("fp32"), calib, test, quiet, log=print)
    rows = []
    combos = [(b, o, s) for b in args.bits_list for o in args.observers for s in args.scopes]
    from tqdm.auto import tqdm

    for bits, obs, scope in tqdm(combos, desc="ptq table", disable=not settings.progress):
        recipe = QuantRecipe(bits, scope=scope, observer=obs, edge_bits=args.edge_bits)
        rows.append(run_ptq(loaded.model, loaded.tokenizer, recipe, calib, test, quiet, log=print))
    result = {
        "command": args.command_line,
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "pretrained": args.pretrained,
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "bits": args.bits_list,
        "observers": args.observers,
        "scopes": args.scopes,
        "fp32": fp,
        "rows": rows,
        "settings": settings_dict(settings),
        "env": environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(ptq_markdown(result))
    print(ptq_markdown(result))
    return result
