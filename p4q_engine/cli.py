"""``p4q`` command line: demo, ptq, eval, ptq-table, train, export, classify, inspect, serve, train-reference.

Bad options and bad inputs print one line (``p4q: error: ...``) and exit with status 2 - never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from p4q_engine.batch.cli import add_dataset_args, cmd_classify_dataset
from p4q_engine.clip.recipe import SCOPES
from p4q_engine.errors import ConfigError, P4QError
from p4q_engine.quant.observers import OBSERVERS
from p4q_engine.quant.spec import BIT_CONFIGS, parse_bit_config
from p4q_engine.serve.cli import add_serve_parser

DEFAULT_MODEL = "P4Q-Ref-Tiny"
PAPER_BITS = ("8-8-8", "4-4-8", "3-3-8", "2-2-8")


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"p4q: error: {message}\n")
        sys.exit(2)


def _bits(text: str) -> str:
    try:
        return parse_bit_config(text).name
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _csv(kind: Callable[[str], str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        return [kind(t) for t in text.split(",") if t]

    return parse


def _choice(options: Sequence[str], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in options:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(options)}")
        return text.lower()

    return parse


# ---------------------------------------------------------------- shared argument groups
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"open_clip model name (default: {DEFAULT_MODEL}, the embedded reference CLIP)",
    )
    g.add_argument(
        "--pretrained",
        default=None,
        help="open_clip pretrained tag, e.g. openai or laion2b_s34b_b79k (downloads on an online machine)",
    )
    g.add_argument("--checkpoint", default=None, help="local checkpoint file (.pt/.bin/.safetensors)")
    g.add_argument(
        "--quick-gelu",
        action="store_true",
        default=None,
        help="force QuickGELU (needed for OpenAI weights in a local checkpoint)",
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from p4q_engine.data.datasets import DATASETS

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default="reference",
        type=_choice(DATASETS, "dataset"),
        help=f"one of {', '.join(DATASETS)} (default: reference, the embedded synthetic task)",
    )
    g.add_argument("--data-root", default=None, help="dataset folder (cifar100, imagenet, imagefolder)")
    g.add_argument("--download", action="store_true", help="download CIFAR-100 into --data-root if missing")
    g.add_argument("--eval-size", type=int, default=None, help="evaluate on a fixed subset of this many images")


def _add_quant_args(p: argparse.ArgumentParser, bits_default: Optional[str] = "4-4-8") -> None:
    g = p.add_argument_group("quantization")
    g.add_argument(
        "--bits",
        type=_bits,
        default=bits_default,
        help=f"W-A-Attention bits: {', '.join(BIT_CONFIGS)} or any of 2/3/4/8 per field",
    )
    g.add_argument(
        "--observer",
        type=_choice(tuple(OBSERVERS), "observer"),
        default="omse",
        help=f"calibrator: {', '.join(OBSERVERS)}",
    )
    g.add_argument(
        "--scope",
        type=_choice(tuple(SCOPES), "scope"),
        default="full",
        help="full: every block Linear and attention matmul; release: what the authors' code quantizes",
    )
    g.add_argument("--edge-bits", type=int, default=8, help="bits of patch/token embedding and projections")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--calib-batches", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from p4q_engine.p4q.losses import LOSS_MODES
    from p4q_engine.p4q.prompt import CLASS_POSITIONS

    g = p.add_argument_group("training (defaults: the paper's Sec. 4.1)")
    g.add_argument("--out", required=True, help="output directory (checkpoint, resumable state, metrics.json)")
    g.add_argument(
        "--method",
        default="p4q",
        type=_choice(("p4q", "coop", "lp", "qlp"), "method"),
        help="p4q; coop (FP + learnable prompt); lp (linear probe, FP); qlp (linear probe, quantized)",
    )
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--train-batch-size", type=int, default=128)
    g.add_argument("--train-size", type=int, default=None, help="use a fixed subset of this many training images")
    g.add_argument("--no-prompt", action="store_true", help="ablation: no learnable prompt (template text)")
    g.add_argument("--no-adapter", action="store_true", help="ablation: no QAdapter")
    g.add_argument("--loss", default="both", type=_choice(LOSS_MODES, "loss"), help="ce, kd or both")
    g.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the distillation loss")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    g.add_argument("--n-ctx", type=int, default=16, help="prompt length M (0 = no prompt)")
    g.add_argument("--ctx-init", default=None, help='initialise the context from a phrase, e.g. "a photo of a"')
    g.add_argument("--class-position", default="end", type=_choice(CLASS_POSITIONS, "class token position"))
    g.add_argument("--class-specific", action="store_true", help="one context per class")
    g.add_argument("--alpha", type=float, default=0.2, help="QAdapter adapt ratio")
    g.add_argument("--reduction", type=int, default=4, help="QAdapter bottleneck ratio r (d -> d/r -> d)")
    g.add_argument(
        "--adapter-bits",
        default="8",
        type=_choice(("8", "model"), "adapter bits"),
        help="QAdapter weights/activations at 8 bits (the paper) or at the model's W/A bits",
    )
    g.add_argument(
        "--adapter-ptq",
        action="store_true",
        help="train the QAdapter in float and quantize it afterwards (default: quantization-aware)",
    )
    g.add_argument("--prompt-lr", type=float, default=2e-3, help="SGD learning rate of the prompt")
    g.add_argument("--adapter-lr", type=float, default=1e-3, help="AdamW learning rate of the QAdapter")
    g.add_argument("--no-cache", action="store_true", help="recompute the frozen image features")


# ---------------------------------------------------------------- helpers
def _settings(args: argparse.Namespace):
    from p4q_engine.ptq import PTQSettings, resolve_device

    if args.calib_batches < 1 or args.batch_size < 1:
        raise ConfigError("--calib-batches and --batch-size must be positive")
    return PTQSettings(
        calib_batches=args.calib_batches,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        workers=args.workers,
        progress=not args.quiet,
        seed=args.seed,
    )


def _load(args: argparse.Namespace):
    from p4q_engine.clip.loading import load_clip

    return load_clip(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, quick_gelu=args.quick_gelu)


def _data(args: argparse.Namespace, preprocess, split: str, size: Optional[int] = None):
    from p4q_engine.data.datasets import load_dataset

    return load_dataset(
        args.dataset, split=split, data_root=args.data_root, transform=preprocess, download=args.download, size=size
    )


def _recipe(args: argparse.Namespace, bits: str, observer: Optional[str] = None, scope: Optional[str] = None):
    from p4q_engine.clip.recipe import QuantRecipe

    return QuantRecipe(bits, scope=scope or args.scope, observer=observer or args.observer, edge_bits=args.edge_bits)


def _command_line(argv: Sequence[str]) -> str:
    return "p4q " + " ".join(shlex.quote(a) for a in argv)


def _write_json(path: Optional[str], obj: dict) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


# ---------------------------------------------------------------- commands
def cmd_ptq(args: argparse.Namespace) -> int:
    """Quantize, calibrate, and compare zero-shot accuracy with full precision."""
    from p4q_engine.ptq import environment, run_ptq, settings_dict

    s = _settings(args)
    loaded = _load(args)
    calib = _data(args, loaded.preprocess, "calib")
    test = _data(args, loaded.preprocess, "test", args.eval_size)
    fp = run_ptq(loaded.model, loaded.tokenizer, _recipe(args, "fp32"), calib, test, s, log=print)
    q = run_ptq(loaded.model, loaded.tokenizer, _recipe(args, args.bits), calib, test, s, log=print)
    _write_json(
        args.out,
        {
            "command": args.command_line,
            "model": args.model,
            "pretrained": args.pretrained,
            "checkpoint": args.checkpoint,
            "dataset": args.dataset,
            "fp32": fp,
            "quantized": q,
            "settings": settings_dict(s),
            "env": environment(),
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Zero-shot top-1/top-5 of a model, in full precision or (with --bits) fake-quantized."""
    from p4q_engine.ptq import run_ptq

    if args.p4q:
        return _eval_trained(args)
    s = _settings(args)
    loaded = _load(args)
    calib = _data(args, loaded.preprocess, "calib")
    test = _data(args, loaded.preprocess, args.split or "test", args.eval_size)
    row = run_ptq(loaded.model, loaded.tokenizer, _recipe(args, args.bits), calib, test, s)
    _write_json(
        args.out,
        {
            "command": args.command_line,
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split or "test",
            **row,
        },
    )
    return 0


def cmd_ptq_table(args: argparse.Namespace) -> int:
    """The paper's Table 1 layout for PTQ: every observer x bit config x scope on one dataset."""
    from p4q_engine.report import ptq_table

    ptq_table(args, _settings(args), _load(args), _data)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded task end to end: full precision vs. PTQ at 8-8-8 and 4-4-8 (OMSE, full scope)."""
    from p4q_engine.ptq import run_ptq

    args.model, args.pretrained, args.checkpoint, args.quick_gelu = DEFAULT_MODEL, None, None, None
    args.dataset, args.data_root, args.download = "reference", None, False
    s = _settings(args)
    loaded = _load(args)
    calib = _data(args, loaded.preprocess, "calib")
    test = _data(args, loaded.preprocess, "test", args.eval_size)
    print(f"reference task: {len(test.classnames)} classes, {len(test.dataset)} held-out test images")
    rows = [
        run_ptq(loaded.model, loaded.tokenizer, _recipe(args, b, "omse", "full"), calib, test, s, log=print)
        for b in ("fp32", "8-8-8", "4-4-8", "2-2-8")
    ]
    print("\n| bits | top-1 | top-5 |\n|---|---|---|")
    for r in rows:
        print(f"| {r['bits']} | {r['top1']:.2f} | {r['top5']:.2f} |")
    _demo_export_and_classify(args, s)
    return 0


def _demo_export_and_classify(args: argparse.Namespace, s) -> None:
    """Export 4-4-8 to a .p4q artifact and classify a few held-out images from PNG files with the engine."""
    from p4q_engine.artifact.format import save
    from p4q_engine.data.reference import ReferenceDataset
    from p4q_engine.runtime.engine import Engine

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args.bits = "4-4-8"
    path = out / "reference-4-4-8.p4q"
    size = save(_export_artifact(args, s), path)
    print(f"\nexported {path} ({size / 2**10:.1f} KiB)")
    raw = ReferenceDataset("test", size=4, transform=lambda im: im)
    paths = []
    for i in range(len(raw)):
        img, label = raw[i]
        p = out / f"test_{i}_{raw.classnames[label].replace(' ', '_')}.png"
        img.save(p)
        paths.append(str(p))
    _print_predictions(paths, Engine.load(path).classify(paths, top_k=3), False)


def _export_artifact(args: argparse.Namespace, s) -> "object":
    from p4q_engine.artifact.export import export_ptq

    loaded = _load(args)
    calib = _data(args, loaded.preprocess, "calib")
    classes = _data(args, loaded.preprocess, "test")
    meta = {
        "name": args.model,
        "pretrained": args.pretrained,
        "checkpoint": args.checkpoint,
        "dataset": args.dataset,
        "command": args.command_line,
    }
    return export_ptq(loaded.model, loaded.tokenizer, _recipe(args, args.bits), calib, classes, s, meta)


def cmd_export(args: argparse.Namespace) -> int:
    """Fold a calibrated PTQ model into a packed ``.p4q`` artifact."""
    from p4q_engine.artifact.format import save

    if args.p4q:
        from p4q_engine.p4q.pipeline import export_trained

        art = export_trained(args.p4q, meta={"command": args.command_line})
    elif args.bits == "fp32":
        raise ConfigError("export needs a quantized bit config (e.g. --bits 4-4-8)")
    else:
        art = _export_artifact(args, _settings(args))
    size = save(art, args.out)
    print(
        f"wrote {args.out} ({size / 2**20:.2f} MiB, {len(art.manifest['classes']['names'])} classes, "
        f"{art.manifest['model']['recipe']['bits']} {art.manifest['model']['recipe']['scope']})"
    )
    return 0


def _print_predictions(paths: Sequence[str], preds, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{"image": p, "labels": r.labels, "probs": r.probs} for p, r in zip(paths, preds)], indent=2))
        return
    for p, r in zip(paths, preds):
        print(p)
        for label, prob in zip(r.labels, r.probs):
            print(f"  {prob:7.2%}  {label}")


def cmd_classify(args: argparse.Namespace) -> int:
    """Top-k zero-shot labels of image files with an artifact, or of a dataset into Parquet (``--input``)."""
    from p4q_engine.runtime.engine import Engine

    if args.input is not None or args.output is not None or args.ray:
        return cmd_classify_dataset(args)
    if not args.images:
        raise ConfigError("classify needs image files, or --input DIR|GLOB|FILE.parquet --output results.parquet")
    engine = Engine.load(args.artifact)
    _print_predictions(args.images, engine.classify(args.images, top_k=args.top_k), args.json)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print an artifact's layers, bits and sizes - of exactly the artifacts the engine loads: it is built (CPU) and
    self-tested first, so an artifact ``Engine.load`` refuses is one ``p4q: error:`` line and exit 2 here too."""
    from p4q_engine.artifact.format import load
    from p4q_engine.artifact.inspect import summarize
    from p4q_engine.runtime.engine import Engine

    art = load(args.artifact)
    engine = Engine.from_artifact(art)
    print(summarize(art, engine.manifest_spec))
    return 0


def _p4q_config(args: argparse.Namespace):
    from p4q_engine.p4q.trainer import P4QConfig

    if args.n_ctx < 0:
        raise ConfigError(f"--n-ctx must be >= 0, got {args.n_ctx}")
    return P4QConfig(
        prompt=not args.no_prompt and args.n_ctx > 0,
        n_ctx=max(args.n_ctx, 1),
        ctx_init=args.ctx_init,
        class_position=args.class_position,
        class_specific=args.class_specific,
        adapter=not args.no_adapter,
        alpha=args.alpha,
        reduction=args.reduction,
        adapter_bits=args.adapter_bits,
        adapter_qat=not args.adapter_ptq,
        loss=args.loss,
        lam=args.lam,
        temperature=args.temperature,
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        prompt_lr=args.prompt_lr,
        adapter_lr=args.adapter_lr,
        seed=args.seed,
    )


def _source(args: argparse.Namespace):
    from p4q_engine.p4q.pipeline import Source

    return Source(
        model=args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        quick_gelu=args.quick_gelu,
        dataset=args.dataset,
        data_root=args.data_root,
        train_size=args.train_size,
        eval_size=args.eval_size,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train P4Q (or a baseline: CoOp, linear probe, quantized linear probe) and save it to ``--out``."""
    from dataclasses import asdict

    from p4q_engine.p4q import baselines
    from p4q_engine.p4q.pipeline import prepare
    from p4q_engine.p4q.trainer import save_trained, train

    s = _settings(args)
    src = _source(args)
    if args.method == "coop":  # CoOp: full-precision model, learnable prompt, L_c only
        args.bits, args.no_adapter, args.loss = "fp32", True, "ce"
    if args.method == "p4q" and args.bits == "fp32":
        raise ConfigError("P4Q trains a quantized model: pass --bits (e.g. 4-4-8), or use --method coop")
    cfg = _p4q_config(args)
    cfg.validate()
    prepared = prepare(src, _recipe(args, args.bits), s, use_cache=not args.no_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zs = {"fp32": baselines.zero_shot(prepared.data, False), "ptq": baselines.zero_shot(prepared.data, True)}
    if args.method in ("lp", "qlp"):
        res = baselines.linear_probe(prepared.data, quantized=args.method == "qlp")
        _write_json(
            str(out / "metrics.json"),
            {
                "command": args.command_line,
                "method": args.method,
                "bits": args.bits,
                "source": asdict(src),
                "test": res,
                "zero_shot": zs,
            },
        )
        return 0
    result = train(
        prepared.student,
        prepared.loaded.tokenizer,
        prepared.data,
        cfg,
        out_dir=out,
        progress=not args.quiet,
        log=None if args.quiet else print,
        device=s.device,
    )
    result.metrics.update({"zero_shot": zs, "method": args.method, "command": args.command_line})
    save_trained(result, prepared.student, prepared.data, out, asdict(src))
    t = result.metrics["test"]
    print(
        f"{args.method} {args.bits} {args.scope}: test top-1 {t['top1']:.2f} top-5 {t['top5']:.2f} "
        f"(zero-shot FP {zs['fp32']['top1']:.2f}, PTQ {zs['ptq']['top1']:.2f}); saved {out}"
    )
    return 0


def _eval_trained(args: argparse.Namespace) -> int:
    """``p4q eval --p4q DIR``: accuracy of a trained P4Q model on its dataset's evaluation split (recomputed)."""
    from p4q_engine.data.datasets import adaptation_splits, load_dataset
    from p4q_engine.eval.zeroshot import evaluate
    from p4q_engine.p4q.pipeline import load_trained, trained_class_features
    from p4q_engine.ptq import loader

    s = _settings(args)
    t = load_trained(args.p4q)
    split = args.split or adaptation_splits(t.source.dataset)[1]
    data = load_dataset(
        t.source.dataset,
        split=split,
        data_root=args.data_root or t.source.data_root,
        transform=t.loaded.preprocess,
        size=args.eval_size or t.source.eval_size,
    )
    classifier = trained_class_features(t)

    def encode(images):
        z = t.qmodel.encode_image(images)
        return t.adapter(z) if t.adapter is not None else z

    with __import__("torch").no_grad():
        res = evaluate(encode, classifier, loader(data.dataset, s), progress=not args.quiet)
    _write_json(
        args.out,
        {
            "command": args.command_line,
            "p4q": args.p4q,
            "dataset": t.source.dataset,
            "split": split,
            "bits": t.qmodel.recipe.bits.name,
            "scope": t.qmodel.recipe.scope,
            **res,
        },
    )
    return 0


def cmd_train_reference(args: argparse.Namespace) -> int:
    """Retrain the embedded reference CLIP from scratch (the committed checkpoint came from this command)."""
    from p4q_engine.reference.train import train_reference

    train_reference(out=args.out, seed=args.seed)
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="p4q", description="P4Q low-bit CLIP: PTQ, evaluation and the embedded reference task.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    d = sub.add_parser("demo", help="run the embedded reference task end to end (no downloads)")
    d.add_argument("--eval-size", type=int, default=1000)
    d.add_argument("--out-dir", default="p4q-demo", help="where the demo artifact and images are written")
    _add_run_args(d)
    d.set_defaults(func=cmd_demo, edge_bits=8, scope="full", observer="omse", bits="4-4-8")

    q = sub.add_parser("ptq", help="post-training quantize a CLIP and evaluate zero-shot")
    _add_model_args(q), _add_data_args(q), _add_quant_args(q), _add_run_args(q)
    q.add_argument("--out", default=None, help="write the JSON report here")
    q.set_defaults(func=cmd_ptq)

    e = sub.add_parser("eval", help="zero-shot accuracy of a model (float, or fake-quant with --bits)")
    _add_model_args(e), _add_data_args(e), _add_quant_args(e, bits_default="fp32"), _add_run_args(e)
    e.add_argument(
        "--split", default=None, help="dataset split (default: test; with --p4q: the dataset's adaptation test split)"
    )
    e.add_argument(
        "--p4q",
        default=None,
        metavar="DIR",
        help="evaluate a `p4q train` output (its model, bits and dataset come from the checkpoint)",
    )
    e.add_argument("--out", default=None)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("ptq-table", help="Table 1 (PTQ rows): all observers x bit configs x scopes")
    _add_model_args(t), _add_data_args(t), _add_run_args(t)
    t.add_argument("--bits-list", type=_csv(_bits), default=list(PAPER_BITS))
    t.add_argument("--observers", type=_csv(_choice(tuple(OBSERVERS), "observer")), default=list(OBSERVERS))
    t.add_argument("--scopes", type=_csv(_choice(tuple(SCOPES), "scope")), default=list(SCOPES))
    t.add_argument("--edge-bits", type=int, default=8)
    t.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    t.set_defaults(func=cmd_ptq_table)

    tr = sub.add_parser("train", help="train P4Q (prompt + QAdapter + distillation) or a baseline")
    _add_model_args(tr), _add_data_args(tr), _add_quant_args(tr), _add_run_args(tr)
    _add_train_args(tr)
    tr.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="calibrate and fold a PTQ model into a packed .p4q artifact")
    _add_model_args(x), _add_data_args(x), _add_quant_args(x), _add_run_args(x)
    x.add_argument("--out", required=True, help="artifact path, e.g. model.p4q")
    x.add_argument(
        "--p4q",
        default=None,
        metavar="DIR",
        help="export a `p4q train` output (prompt and QAdapter folded in) instead of a plain PTQ model",
    )
    x.set_defaults(func=cmd_export)

    c = sub.add_parser(
        "classify",
        help="zero-shot classify image files, or a whole dataset into Parquet (--input/--output, optionally --ray)",
    )
    c.add_argument("artifact")
    c.add_argument("images", nargs="*", help="image files (printed), or use --input/--output for a dataset")
    c.add_argument("--top-k", type=int, default=5)
    c.add_argument("--json", action="store_true", help="print JSON")
    add_dataset_args(c)
    c.set_defaults(func=cmd_classify)

    i = sub.add_parser("inspect", help="print a .p4q artifact's layers, bits and sizes")
    i.add_argument("artifact")
    i.set_defaults(func=cmd_inspect)

    add_serve_parser(sub, _choice)

    r = sub.add_parser("train-reference", help="retrain the embedded reference CLIP (<= 10 min on 2 CPU cores)")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_train_reference)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return args.func(args)
    except P4QError as e:
        sys.stderr.write(f"p4q: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("p4q: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
