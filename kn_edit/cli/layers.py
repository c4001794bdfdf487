"""`kn-edit choose-layer`: measure where a key-value method (rome, kn-subject, memit) should edit a model."""

from __future__ import annotations

import argparse

from .evaluate import _quiet_lightning, _run_arguments
from .ui import console, table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "choose-layer",
        help="measure the edit layer of rome / kn-subject / memit on a model (a small layer sweep) and keep it",
        description="Edits the same facts the model knows at each candidate layer (one comparison), scores each "
        "layer by edit success, paraphrase top-1 and neighbours kept, less the text change, and keeps the best "
        "for the model in $KN_EDIT_CACHE/layers/MODEL.json: later edits of that model by that method use it when "
        "no layer is given (their details say so). save=false only reports.",
    )
    _run_arguments(parser, "configs/layers/gemma3_rome.yaml",
                   "method=kn-subject 'layers=[3,5,7]' data.max_facts=12 save=false", config_required=False)
    parser.set_defaults(func=run_choose_layer)


def run_choose_layer(args: argparse.Namespace) -> int:
    from ..evaluation.layer_sweep import SCORED, TEXT, LayerSweepConfig, sweep_layers
    from ..progress import default_reporter
    from ..storage.config import load_config

    _quiet_lightning()
    config = load_config(LayerSweepConfig, args.config, args.overrides).check()
    sweep = sweep_layers(config, reporter=default_reporter(args.quiet))
    out = console()
    # short headers and percentages: the table fits 80 columns (labels in kn_edit.evaluation.layer_sweep.SCORED)
    columns = ["layer", "edit", "paraphr.", "same obj.", "other rel.", "text", "refused", "score"]
    rows = [[",".join(map(str, r["layers"]))] + [_percent(r[key]) for key, _ in SCORED]
            + [_percent(r[TEXT[0]], signed=True), _count(r["refused"]), f"{r['score']:.3f}"] for r in sweep.rows]  # fmt: skip
    facts = next(iter(sweep.comparison.results.values())).summary.get("facts_edited")
    out.print(table(f"{config.method} on {config.model}: {facts} facts at each layer", columns, rows))
    out.print("edit, paraphr.: top-1 on the edit prompts / held-out paraphrases; same obj., other rel.: other "
              "subjects' facts with the same object / of other relations kept; text: mean perplexity change")
    chosen = ",".join(map(str, sweep.chosen["layers"]))
    where = f"kept in {sweep.saved_to}" if sweep.saved_to else "not kept (save=false)"
    out.print(f"chosen: layer {chosen} (score {sweep.chosen['score']:.3f}); {where}")
    if sweep.comparison.run_dir is not None:
        out.print(f"every layer's metrics: {sweep.comparison.run_dir}/")
    return 0


def _percent(value, signed: bool = False) -> str:
    if value is None or value != value:  # NaN: nothing of that kind measured
        return "-"
    return f"{100 * value:+.2f} %" if signed else f"{100 * value:.0f} %"


def _count(value) -> str:
    return "-" if value is None or value != value else str(int(value))
