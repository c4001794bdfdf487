"""`kn-edit locate`, `kn-edit probe` and `kn-edit locate-dataset`."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .ui import (FiniteFloat, add_model_argument, add_plot_arguments, add_prompts_argument, add_settings_arguments,
                 check_plot_argument, console, table)

if TYPE_CHECKING:
    from ..models.model import KnModel


def _add_settings(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, "configs/locate.yaml", "steps=20 threshold=0.2 share=0.5 'layers=[20,21]'")


def _add_fact(parser: argparse.ArgumentParser) -> None:
    add_prompts_argument(parser)
    parser.add_argument("--target", "-t", required=True, help="the answer the prompts share, e.g. Paris")
    parser.add_argument("--subject", help="the fact's subject; every prompt must mention it (catches mixed facts)")
    parser.add_argument("--json", action="store_true", help="print JSON only (for scripts)")


def register(sub: argparse._SubParsersAction) -> None:
    locate = sub.add_parser("locate", help="find the knowledge neurons of one fact (integrated gradients)")
    add_model_argument(locate)
    _add_fact(locate)
    add_plot_arguments(locate, "a layer × neuron attribution heatmap")
    _add_settings(locate)
    locate.set_defaults(func=run_locate)

    probe = sub.add_parser("probe", help="P(target) with knowledge neurons suppressed / amplified, vs random neurons")
    add_model_argument(probe)
    _add_fact(probe)
    probe.add_argument("--neurons", metavar="L:I,L:I", help="neurons to probe (default: locate them first)")
    probe.add_argument("--controls", type=int, default=3, help="random control sets, same size and layers (default 3)")
    probe.add_argument("--factor", action=FiniteFloat, default=2.0, help="amplification factor (default 2)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the control neurons (default 0)")
    _add_settings(probe)
    probe.set_defaults(func=run_probe)

    dataset = sub.add_parser("locate-dataset", help="locate the knowledge neurons of every fact of a data set "
                                                    "(Lightning loop, cached; the paper's adaptive share per relation)")
    add_model_argument(dataset)  # --device picks the accelerator kind; devices=... strategy=... the rest
    dataset.add_argument("--data", choices=["pararel", "known1000", "jsonl"], required=True, help="data set")
    dataset.add_argument("--data-dir", help="ParaRel folder, Known 1000 file/folder, or the JSONL fact file "
                                            "(default: the download cache)")
    dataset.add_argument("--relations", help="comma-separated relation ids, e.g. P36,P101 (default: all)")
    dataset.add_argument("--limit", type=int, help="at most this many facts per relation (first ones in file order)")
    dataset.add_argument("--known-only", action="store_true", help="keep only facts the model predicts correctly")
    dataset.add_argument("--out", required=True, help="output folder (must not exist)")
    dataset.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_settings(dataset)
    dataset.set_defaults(func=run_locate_dataset)


def _config(args: argparse.Namespace):
    from ..storage.config import load_config
    from ..locating.locate import LocateConfig

    return load_config(LocateConfig, args.config, args.overrides).check()


def _load(args: argparse.Namespace, quiet: bool) -> KnModel:
    from .. import load
    from ..progress import default_reporter

    return load(args.model, device=args.device, reporter=default_reporter(quiet))


def _locate(km: KnModel, args: argparse.Namespace, cfg):
    from ..locating.locate import adaptive_share, locate_detailed

    result = locate_detailed(km, args.prompts, args.target, cfg.threshold, cfg.share, cfg.steps, cfg.layers, args.subject)
    if cfg.adaptive:
        result = result.with_share(adaptive_share([result.kept], cfg).share)
    return result


def run_locate(args: argparse.Namespace) -> int:
    from ..locating.probe import prompt_probs

    cfg = _config(args)
    check_plot_argument(args)
    km = _load(args, quiet=args.json)
    result = _locate(km, args, cfg)
    probs = prompt_probs(km, result.prompts, result.target).tolist()
    if args.plot:
        from ..locating.plots import plot_locate

        plot_locate(result, args.plot, overwrite=args.overwrite)
    if args.json:
        out = {"model": km.name, **result.to_dict(), "steps": cfg.steps,
               "probabilities": dict(zip(result.prompts, probs)), "plot": args.plot}
        print(json.dumps(out, indent=2))
        return 0
    n = len(result.prompts)
    rows = [[rank + 1, neuron.layer, neuron.index, score, f"{kept}/{n}"]
            for rank, (neuron, score, kept) in enumerate(zip(result.neurons, result.mean_scores, result.kept_by))]
    title = (f"{km.name}: {len(result.neurons)} knowledge neurons for {result.target!r} "
             f"(t={cfg.threshold:g}, p={result.share:g}, {cfg.steps} steps)")
    con = console()
    con.print(table(title, ["rank", "layer", "index", "score", "kept by prompts"], rows))
    con.print(table(f"P({result.target!r})", ["prompt", "p"], [[p, v] for p, v in zip(result.prompts, probs)]))
    if args.plot:
        con.print(f"plot written to {args.plot}")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..models.neurons import parse_neurons
    from ..locating.probe import probe

    if args.controls < 1:
        raise ConfigError("--controls must be at least 1")
    cfg = _config(args)
    km = _load(args, quiet=args.json)
    if args.neurons:
        neurons = parse_neurons(args.neurons)
    else:
        neurons = _locate(km, args, cfg).neurons
    result = probe(km, args.prompts, args.target, neurons, n_controls=args.controls, seed=args.seed, factor=args.factor)
    if args.json:
        print(json.dumps({"model": km.name, **result.to_dict()}, indent=2))
        return 0
    ratios = result.ratios()

    def cell(p: float, r: float) -> str:
        return f"{p:.4g} ({r:+.1%})"

    rows = []
    for i, prompt in enumerate(result.prompts):
        rows.append([prompt, float(result.baseline[i]),
                     cell(float(result.suppressed[i]), float(ratios["suppressed"][i])),
                     cell(float(result.amplified[i]), float(ratios["amplified"][i])),
                     cell(float(result.control_suppressed[:, i].mean()), float(ratios["control_suppressed"][i])),
                     cell(float(result.control_amplified[:, i].mean()), float(ratios["control_amplified"][i]))])
    means = result.to_dict()["mean"]
    rows.append(["mean", means["baseline"], cell(means["suppressed"], means["ratio_suppressed"]),
                 cell(means["amplified"], means["ratio_amplified"]),
                 cell(means["control_suppressed"], means["ratio_control_suppressed"]),
                 cell(means["control_amplified"], means["ratio_control_amplified"])])
    title = (f"{km.name}: P({result.target!r}) with {len(result.neurons)} neurons changed at the answer position "
             f"(control: {args.controls} random same-layer sets; ratio = ΔP/P)")
    con = console()
    con.print(table(title, ["prompt", "baseline", "suppressed", f"amplified ×{args.factor:g}", "control suppressed",
                            "control amplified"], rows))
    con.print("neurons: " + ", ".join(str(n) for n in result.neurons), highlight=False)
    return 0


def _read_facts(args: argparse.Namespace, km: KnModel):
    from ..data import expressible, load_jsonl_facts, load_known1000, load_pararel
    from ..data.records import FactSet
    from ..errors import ConfigError

    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
    masked = km.is_masked_lm
    if args.data == "pararel":
        facts = load_pararel(args.data_dir, masked=masked, relations=relations)
    elif args.data == "known1000":
        facts = load_known1000(args.data_dir, masked=masked)
    else:
        if not args.data_dir:
            raise ConfigError("--data jsonl needs --data-dir FILE.jsonl")
        facts = load_jsonl_facts(args.data_dir, masked=masked)
    records = facts.records
    if relations and args.data != "pararel":
        records = [r for r in records if r.relation in set(relations)]
    if args.limit is not None:
        if args.limit < 1:
            raise ConfigError("--limit must be at least 1")
        per: dict[str, int] = {}
        limited = []
        for r in records:
            per[r.relation] = per.get(r.relation, 0) + 1
            if per[r.relation] <= args.limit:
                limited.append(r)
        records = limited
    facts = expressible(km, FactSet(facts.name, records, facts.skipped))
    if args.known_only:
        from ..data import known_mask

        known = known_mask(km, facts.records)
        facts = FactSet(facts.name, [r for r, k in zip(facts.records, known) if k], facts.skipped)
    return facts


def _quiet_lightning() -> None:
    # Lightning's hardware banner, tips and a torch-version deprecation notice would drown the table.
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=Warning)


def run_locate_dataset(args: argparse.Namespace) -> int:
    from ..locating.dataset import locate_dataset
    from ..errors import DataError
    from ..storage.atomic import check_new_folder
    from ..progress import default_reporter

    _quiet_lightning()
    cfg = _config(args)
    if args.device != "auto" and cfg.accelerator == "auto":
        from ..models.device import resolve_device

        kind = resolve_device(args.device).type
        cfg.accelerator = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}.get(kind, "auto")
    check_new_folder(args.out)  # before the model loads (locate_dataset checks again, for the library)
    # Lightning places the model (one copy per device under DDP), so it is read into CPU memory first.
    args.device = "cpu"
    km = _load(args, quiet=args.quiet)
    facts = _read_facts(args, km)
    if not facts.records:
        raise DataError(f"no usable facts in {facts.name} (skipped: {facts.skipped_counts() or 'none'})")
    result = locate_dataset(km, facts.records, args.out, cfg, reporter=default_reporter(args.quiet),
                            progress=not args.quiet)
    if result.out is None:  # not rank 0
        return 0
    rows = [[r.relation, r.n_facts, r.n_facts_counted, r.share, r.mean_neurons if r.mean_neurons is not None else "-"]
            for r in sorted(result.relations.values(), key=lambda r: r.relation)]
    con = console()
    con.print(table(f"{km.name}: knowledge neurons of {len(result.facts)} facts ({'adaptive' if cfg.adaptive else 'fixed'} share)",
                    ["relation", "facts", "counted", "share", "mean neurons/fact"], rows))
    if facts.skipped:
        con.print(f"skipped facts: {facts.skipped_counts()}", highlight=False)
    con.print(f"computed {result.computed_prompts} prompts (the rest from the cache); results in {result.out}")
    return 0
