"""Command line: ``python -m core COMMAND ...``: fetch-data, prepare, import, index, explain, evaluate,
combine, intervals (``-h`` on each).

Every option is checked before any work starts; errors are one line on stderr with exit code 2
(an interruption: exit code 130, and the work resumes when the command is run again).
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

from .cli_options import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
    index_with_ray,
    k_list,
    number,
    parse_list,
    ray_options,
    ray_settings,
)
from .prepare_settings import PrepareSettings, preset_defaults

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------ prepare and index

def _prepare_parser(sub) -> None:
    p = sub.add_parser("prepare", help="train the classifier, detect spans, make checkpoints, variants and the index",
                       description="Turn a dataset and a backbone into a prepared workspace. Settings left out "
                                   "come from --preset (demo by default).")
    p.add_argument("--dataset", default="mams", help="mams, sentihood, or a data file/folder (SemEval XML, JSONL, CSV)")
    p.add_argument("--data-dir", help="folder holding mams-atsa/ and sentihood/ (default: $SPANLENS_DATA or ../shared/data)")
    p.add_argument("--workspace", required=True, help="folder of the workspace to create or bring up to date")
    p.add_argument("--preset", default="demo", choices=["demo", "paper"],
                   help="demo: packaged MiniLM on CPU; paper: roberta-large, the paper's batch sizes, lr 1e-4, 100 epochs")
    p.add_argument("--model", help="backbone: Hugging Face path or hub id (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--rc-model", help="extractive QA model for reading-comprehension spans (default: heuristic only)")
    p.add_argument("--train-limit", type=POSITIVE, help="use a seeded random subset of this many training instances")
    p.add_argument("--eval-limit", type=POSITIVE, help="likewise for dev and test")
    p.add_argument("--data-seed", type=NON_NEGATIVE,
                   help="seed of the --train-limit/--eval-limit samples (default: --seed); fix it to train "
                        "classifiers of several seeds on one slice")
    p.add_argument("--epochs", type=POSITIVE, help=f"training epochs ({preset_defaults('epochs')})")
    p.add_argument("--batch-size", type=POSITIVE, help=f"training mini-batch ({preset_defaults('batch_size')})")
    p.add_argument("--lr", type=POSITIVE_FLOAT, help=f"AdamW learning rate ({preset_defaults('lr')})")
    p.add_argument("--trainable-layers", type=POSITIVE,
                   help=f"last N encoder layers trained (plus pooler and head; {preset_defaults('trainable_layers')})")
    p.add_argument("--checkpoints", type=POSITIVE,
                   help=f"last C epoch checkpoints kept for TracIn ({preset_defaults('checkpoints')})")
    p.add_argument("--variants", type=POSITIVE, help=f"number of variants theta + delta_i ({preset_defaults('variants')})")
    p.add_argument("--variant-lr", type=POSITIVE_FLOAT,
                   help=f"learning rate of the variants' single step ({preset_defaults('variant_lr')})")
    p.add_argument("--variant-optimizer", choices=["adamw", "sgd"],
                   help="the variants' single step: AdamW's first step (default) or plain SGD")
    p.add_argument("--models", type=POSITIVE,
                   help="classifiers trained independently (theta and N - 1 more with seeds seed+1 ...): TRAK's "
                        "ensemble (default 1: TRAK runs over the checkpoints); build their rows with --with trak")
    p.add_argument("--max-length", type=number(int, 8, name="a whole number"),
                   help=f"max tokens per (aspect, text) pair ({preset_defaults('max_length')})")
    _span_options(p)
    _build_options(p)


def _span_options(p) -> None:
    p.add_argument("--input-format", choices=["auto", "aspect", "single", "pair"],
                   help="what the model reads from a JSONL/CSV row: (aspect, text) pairs, a single text (sentiment, "
                        "topic ...), or a text pair (text_a/text_b or premise/hypothesis); default auto: from the columns")
    p.add_argument("--category-spans", choices=["importance", "anchored"],
                   help="spans of category aspects (SentiHood): the most important clause or sentence of the text "
                        "for that aspect (Eq. 3; default), or the clause of the target mention")
    p.add_argument("--span-importance", action=argparse.BooleanOptionalAction, default=None,
                   help="choose spans among candidate chunks by the logit drop (paper Eq. 3)")


def _build_options(p) -> None:
    p.add_argument("--seed", type=NON_NEGATIVE,
                   help="seed of the run: the variants, the --train-limit/--eval-limit samples and (prepare) the "
                        "training; default 0")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    p.add_argument("--no-index", action="store_true", help="stop before building the gradient index")
    _index_options(p)
    _with_option(p)
    ray_options(p)


def _import_parser(sub) -> None:
    p = sub.add_parser("import", help="explain a classifier fine-tuned elsewhere: a model folder + a dataset -> a "
                                      "workspace (nothing retrained)",
                       description="Import a local save_pretrained folder of a sequence classifier (BERT, RoBERTa, "
                                   "DistilBERT, DeBERTa-v2/v3, ELECTRA ...) with the data it was fine-tuned on. Its "
                                   "labels come from config.json (id2label); its Trainer checkpoint-* folders, when "
                                   "present, are TracIn's checkpoints.")
    p.add_argument("--model", required=True, help="the fine-tuned model's folder (config.json, weights, checkpoint-*/)")
    p.add_argument("--dataset", required=True, help="a data file or folder (JSONL, CSV, SemEval XML), mams or sentihood")
    p.add_argument("--data-dir", help="folder holding mams-atsa/ and sentihood/ (default: $SPANLENS_DATA or ../shared/data)")
    p.add_argument("--workspace", required=True, help="folder of the workspace to create or bring up to date")
    p.add_argument("--rc-model", help="extractive QA model folder for reading-comprehension spans of aspects")
    p.add_argument("--trainable-layers", type=POSITIVE,
                   help="gradients w.r.t. the last N layers, the pooler and the head (default 2): a choice of the "
                        "explanation, the rest held at each point's values")
    p.add_argument("--checkpoints", type=POSITIVE, help="the last C Trainer checkpoints kept for TracIn (default 3)")
    p.add_argument("--train-limit", type=POSITIVE, help="use a seeded random subset of this many training instances")
    p.add_argument("--eval-limit", type=POSITIVE, help="likewise for dev and test")
    p.add_argument("--batch-size", type=POSITIVE, help="the variants' mini-batch (default 32)")
    p.add_argument("--variants", type=POSITIVE, help=f"number of variants theta + delta_i ({preset_defaults('variants')})")
    p.add_argument("--variant-lr", type=POSITIVE_FLOAT,
                   help=f"learning rate of the variants' single step ({preset_defaults('variant_lr')})")
    p.add_argument("--variant-optimizer", choices=["adamw", "sgd"])
    p.add_argument("--max-length", type=number(int, 8, name="a whole number"), help="max tokens per input")
    _span_options(p)
    _build_options(p)


def _with_option(p) -> None:
    p.add_argument("--with", dest="extras", default="", metavar="EXTRAS",
                   help="also build what TRAK/TRAK++ (trak: the index's margin-gradient rows) and EKFAC/EKFAC++ "
                        "(ekfac: the EK-FAC factors, then the index's rows in their eigenbasis) need, comma-separated: "
                        "e.g. --with trak,ekfac")


def _index_options(p) -> None:
    p.add_argument("--proj-dim", type=NON_NEGATIVE,
                   help="dimension d of the gradient sketch (CountSketch); 0 = exact gradients (small data only); "
                        "default: as the workspace's index was built, else 4096")
    p.add_argument("--proj-seed", type=NON_NEGATIVE, help="seed of the sketch (default: as built, else 0)")


def _index_settings(args, *, rebuild: bool = False):
    """The index settings of a command: the workspace's index's (or the default) unless --proj-dim or
    --proj-seed say otherwise. Only ``prepare`` and ``index`` (``rebuild``) may build an index; the
    other commands stop rather than build one on the way."""
    from dataclasses import replace

    from .index import IndexSettings, index_command, saved_settings
    from .workspace import Workspace

    root = Path(args.workspace)
    built = saved_settings(root / "index" / "meta.json")
    current = built or IndexSettings()
    wanted = replace(current, dim=current.dim if args.proj_dim is None else (args.proj_dim or None),
                     seed=current.seed if args.proj_seed is None else args.proj_seed)
    if not rebuild and built is not None and (wanted.dim, wanted.seed) != (built.dim, built.seed):
        raise ValueError(
            f"{root}: its index is built with d = {current.dim or 'exact'}, seed {current.seed}; drop --proj-dim/"
            f"--proj-seed to use it, or rebuild it first (as long as the first build): "
            f"{index_command(Workspace(root), wanted)}")
    return wanted


def cmd_prepare(args) -> int:
    from .prepare import prepare

    settings = PrepareSettings.from_preset(
        args.preset, dataset=args.dataset, data_dir=args.data_dir, model=args.model, rc_model=args.rc_model,
        train_limit=args.train_limit, eval_limit=args.eval_limit, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, trainable_layers=args.trainable_layers, checkpoints=args.checkpoints, variants=args.variants,
        variant_lr=args.variant_lr, variant_optimizer=args.variant_optimizer, models=_models(args),
        max_length=args.max_length, span_importance=args.span_importance, category_spans=args.category_spans,
        input_format=args.input_format, seed=args.seed, data_seed=args.data_seed, device=args.device,
    )
    return _build(args, lambda: prepare(settings, args.workspace))


def _models(args) -> int:
    """--models, or when it is left out the number the workspace's earlier prepare trained: each of
    those classifiers cost a training, so only an explicit `--models 1` removes them."""
    from .workspace import Workspace

    if args.models is not None:
        return args.models
    ws = Workspace(args.workspace)
    recorded = int(ws.manifest().settings.get("models", 1)) if ws.exists() else 1
    if recorded > 1:
        print(f"[models] keeping the {recorded - 1} classifiers besides theta of the earlier prepare "
              "(--models 1 removes them)")
    return recorded


def cmd_import(args) -> int:
    from .importing import ImportSettings, import_model

    given = {k: getattr(args, k) for k in ("data_dir", "rc_model", "train_limit", "eval_limit", "trainable_layers",
                                           "checkpoints", "variants", "variant_lr", "variant_optimizer", "batch_size",
                                           "max_length", "span_importance", "category_spans", "input_format", "seed",
                                           "device")}
    settings = ImportSettings(model=args.model, dataset=args.dataset,
                              **{k: v for k, v in given.items() if v is not None})
    return _build(args, lambda: import_model(settings, args.workspace))


def _build(args, make) -> int:
    """Check the index options, make the workspace (``make()`` returns its manifest), build its
    index unless --no-index, and print the summary."""
    from .artifacts import check_extras
    from .backend import index_workspace
    from .workspace import Workspace

    index_settings = _index_settings(args, rebuild=True)
    extras = check_extras(parse_list(args.extras))
    ray_settings(args)  # its options checked before any work
    manifest = make()
    if not args.no_index:
        index_with_ray(args, lambda pool: index_workspace(Workspace(args.workspace), index_settings,
                                                           device=args.device, extras=extras, mapper=pool))
        manifest = Workspace(args.workspace).manifest()
    _summary(manifest)
    return 0


def _summary(manifest) -> None:
    from .workspace import STAGES

    print("\nSummary")
    for stage in STAGES:
        if stage not in manifest.stages:
            continue
        rec = manifest.stages[stage]
        print(f"  {stage:<11} {rec.get('seconds', 0):>8.1f}s  {json.dumps(rec.get('counts') or rec.get('timings') or '')}")
    spans = manifest.stages.get("spans", {}).get("stats")
    if spans:
        print(f"  spans: {json.dumps(spans)}")
        past = {k: v for k, v in (spans.get("past_token_limit") or {}).items() if k in ("train", "dev", "test") and v}
        if past:
            print(f"  warning: spans past the token limit ({', '.join(f'{k} {v}' for k, v in past.items())}): "
                  "masking them changes nothing, so their span scores are 0")
    for key in ("dev_accuracy", "test_accuracy", "best_epoch", "index"):
        if key in manifest.results:
            print(f"  {key}: {manifest.results[key]}")
    for record in manifest.stages.get("models", {}).get("records", []):
        print(f"  {record['point']} (seed {record['seed']}): dev_accuracy {record['dev_accuracy']}, "
              f"test_accuracy {record['test_accuracy']}")
    missing = manifest.stages.get("model", {}).get("checkpoints_missing")
    if missing:
        print(f"  unavailable: TracIn, Control and TRAK (no checkpoints: {missing})")


def cmd_index(args) -> int:
    from .ann import AnnSettings, check_sketched
    from .artifacts import check_extras
    from .backend import Backend, index_workspace
    from .workspace import Workspace

    ws = Workspace(args.workspace)
    extras = check_extras(parse_list(args.extras))
    if not ws.exists():
        raise FileNotFoundError(f"{ws.root}: no manifest.json; run `python -m core prepare` first")
    settings = _index_settings(args, rebuild=True)
    ann = _ann_methods(args.ann)  # names and the layout checked before the build
    if ann is None and args.ann_rank is not None:
        raise ValueError("--ann-rank goes with --ann")
    if ann is not None:
        check_sketched(settings.dim)
    index = index_with_ray(args, lambda pool: index_workspace(ws, settings, device=args.device, extras=extras,
                                                               mapper=pool))
    if ann is not None:
        backend = Backend(ws.root, device=args.device, index_settings=settings)
        backend.build_ann(ann or backend.available_methods(), AnnSettings(rank=args.ann_rank or AnnSettings.rank))
    print(json.dumps({k: index.meta[k] for k in ("dim", "seconds", "examples_per_second", "projection")}, indent=2))
    return 0


def _ann_methods(value: str | None) -> list[str] | None:
    """``--ann``: None (not asked), [] (all the workspace can run) or the methods' names."""
    from .registry import METHODS

    if value is None:
        return None
    names = list(parse_list(value))
    if not names:
        raise ValueError("--ann needs method names (comma-separated) or all")
    return [] if names == ["all"] else [METHODS.resolve(n).name for n in names]


# ------------------------------------------------------------------------------ explain

def _scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ihvp", choices=["fast", "lissa"], default="fast", help="inverse Hessian for the IF family")
    p.add_argument("--damping", type=POSITIVE_FLOAT,
                   help="lambda of the fast inverse (G + lambda I)^-1 (default 2.5, the lambda of the paper's LiSSA settings)")
    p.add_argument("--lissa-depth", type=POSITIVE, default=1000, help="LiSSA's most steps (default 1000, the paper's)")
    p.add_argument("--paper-signs", action="store_true",
                   help="the paper's literal signs: IF with Eq. 1's minus, g(z'_-kl) - g(z') on the ++ test side "
                        "(their opponents then rank first)")


def _scoring(args, exact: bool = False):
    from .ihvp import DEFAULT_DAMPING, LissaSettings
    from .scoring import ScoreSettings

    return ScoreSettings(args.ihvp, DEFAULT_DAMPING if args.damping is None else args.damping,
                         LissaSettings(depth=args.lissa_depth), args.paper_signs, exact)


def _explain_parser(sub) -> None:
    from .ann import AnnSettings
    from .registry import METHODS

    p = sub.add_parser("explain", help="rank training instances (and spans) for a test instance",
                       description="Explain a prediction with the top-K training instances of one or more methods.")
    p.add_argument("--workspace", required=True)
    p.add_argument("--test-id", help="id of a dataset instance (see instances.jsonl)")
    p.add_argument("--test-text", help="a new text to explain (with --aspect, or --text-a for a text pair)")
    p.add_argument("--aspect", "--text-a", dest="aspect",
                   help="the aspect of --test-text; for a workspace of text pairs, the pair's first text")
    p.add_argument("--method", action="append", required=True,
                   help=f"repeatable, or comma-separated: {METHODS.help_text()}")
    p.add_argument("--label", default="predicted",
                   help="the label explained: predicted (default: what the model predicted), gold, or a label name")
    p.add_argument("--k", type=POSITIVE, default=10,
                   help="training instances listed per method (default 10; past the training set, all, with a note)")
    p.add_argument("--opponents", action="store_true", help="also list the most negative scores")
    p.add_argument("--exact", action="store_true", help="exact gradients, no projection (slow; small workspaces)")
    p.add_argument("--approximate", action="store_true",
                   help="top-K from FAISS candidates, rescored exactly (large indexes; build them with index --ann)")
    p.add_argument("--candidates", type=POSITIVE, default=AnnSettings.candidates,
                   help=f"with --approximate: candidates per matrix, as a multiple of K (default {AnnSettings.candidates})")
    p.add_argument("--check-recall", action="store_true",
                   help="with --approximate: also score exactly and print recall@K of the approximate proponents "
                        "and opponents")
    _scoring_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    _index_options(p)


def cmd_explain(args) -> int:
    from .ann import AnnSettings, list_recall
    from .backend import Backend
    from .explain_output import json_view, print_table
    from .registry import METHODS

    methods = [METHODS.resolve(m).name for value in args.method for m in parse_list(value)]  # checked before loading
    if not methods:
        raise ValueError("--method needs a method name")
    if (args.test_text is None) == (args.test_id is None):
        raise ValueError("give either --test-id ID or --test-text TEXT (with --aspect ASPECT for aspects)")
    settings = _scoring(args, args.exact)
    backend = Backend(args.workspace, device=args.device, index_settings=_index_settings(args))
    k = min(args.k, len(backend.train_ids))
    if k < args.k:
        print(f"note: --k {args.k} is past the workspace's {k} training instances: all of them are listed",
              file=sys.stderr)
    if args.test_text is not None:
        if not args.aspect and backend.input_format != "single":
            raise ValueError("--test-text needs --aspect" if backend.input_format == "aspect" else
                             "--test-text needs the pair's first text (--text-a)")
        test = backend.new_input(args.test_text, args.aspect or "", args.label)
    else:
        test = backend.test_input(args.test_id, args.label)
    recall: dict[str, dict[str, float]] = {}
    if args.approximate:
        search = AnnSettings(candidates=args.candidates)
        explanations = [backend.explain_approximate(test, m, k=k, settings=settings, search=search) for m in methods]
        if args.check_recall:
            for approx, exact in zip(explanations, backend.explain_many(test, methods, k=k, settings=settings)):
                recall[approx.method] = {"recall": list_recall(approx.top, exact.top),
                                         "recall_opponents": list_recall(approx.opponents, exact.opponents)}
    elif args.check_recall:
        raise ValueError("--check-recall goes with --approximate")
    else:
        explanations = backend.explain_many(test, methods, k=k, settings=settings)
    profile = backend.profile(test)
    view = {"id": test.id, "aspect": test.aspect, "text": test.text, "span": test.span, "gold": test.gold,
            "predicted": profile["label"], "explained": explanations[0].label, "probability": max(profile["probs"]),
            "span_masks_nothing": profile["span_masks_nothing"]}
    if args.json:
        print(json.dumps([{"test": view, **json_view(backend, e, args.opponents)}
                          | recall.get(e.method, {}) for e in explanations],
                         indent=2, ensure_ascii=False))
        return 0
    print(f"test {test.id or '(new review)'}: gold {test.gold or '-'}, predicted {view['predicted']} "
          f"(p = {view['probability']:.2f}); explaining {view['explained']}")
    if view["span_masks_nothing"]:
        print("  warning: the test span masks no token (past the token limit?): span methods score 0 for it")
    for exp in explanations:
        print_table(backend, test, exp, args.opponents)
        if exp.method in recall:
            print(f"  recall@{k} of the approximate lists against the exact ones: proponents "
                  f"{recall[exp.method]['recall']:.2f}, opponents {recall[exp.method]['recall_opponents']:.2f}")
    return 0


# ------------------------------------------------------------------------------ evaluate

def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="Sag, Lag, Ral, K-curves and faithfulness: the paper's tables 3 and 4, figure 1",
                       description="Evaluate explanation methods on a seeded sample of test instances (without those "
                                   "whose span is marked wrong); resumes an interrupted run from the workspace's store.")
    p.add_argument("--workspace", required=True)
    p.add_argument("--methods", default="all",
                   help="all (every method; the default), paper (the paper's six), or a comma list of names and groups")
    p.add_argument("--k", type=k_list, default=(10, 100), help="K values of Sag@K and Lag@K in the tables (default 10,100)")
    p.add_argument("--kmax", type=POSITIVE, default=100, help="K-curves for K = 1..kmax (default 100)")
    p.add_argument("--test-limit", type=NON_NEGATIVE, default=200, help="test instances (default 200; 0 = all eligible)")
    p.add_argument("--out", help="report folder (default: WORKSPACE/evaluation)")
    p.add_argument("--ral", help="removal percentages for Ral, or none; each is one retrain per method (minutes each on "
                                 "full MAMS); default 20,50 (none for an imported model: Ral retrains from the "
                                 "backbone's initial state, which an imported model does not have)")
    p.add_argument("--faithfulness-runs", type=NON_NEGATIVE, default=5, help="runs of table 4 (default 5; 0 = skip faithfulness)")
    p.add_argument("--lds", action="store_true",
                   help="LDS and span-LDS: retrain on --lds-subsets random subsets (twice: keeping only the subset, "
                        "masking its spans) and correlate each method's predicted output with the retrained ones")
    p.add_argument("--lds-subsets", type=number(int, 2, name="a whole number"), default=50,
                   help="subsets M for LDS (default 50; each is one retrain per intervention)")
    p.add_argument("--lds-alpha", type=number(float, 0, above=True), default=0.5,
                   help="fraction of the training set in each subset: kept (LDS) or span-masked (span-LDS); default 0.5")
    ray_options(p)
    _scoring_options(p)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the test sample and the random baselines (default 0)")
    p.add_argument("--batch", type=POSITIVE, default=16, help="test instances scored together (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    _index_options(p)


def cmd_evaluate(args) -> int:
    import pandas as pd

    from .backend import Backend
    from .evaluate import EvalSettings, run_evaluation
    from .evaluate.render import lds_frame
    from .ihvp import DEFAULT_DAMPING, LissaSettings
    from .lds import LdsSettings
    from .workspace import Workspace

    out = Path(args.out) if args.out else Path(args.workspace) / "evaluation"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the report")
    imported = Workspace(args.workspace).manifest().settings.get("imported")
    settings = EvalSettings(
        methods=parse_list(args.methods), ks=args.k, kmax=args.kmax, test_limit=args.test_limit or None,
        ral=parse_list(args.ral or ("none" if imported else "20,50"), float), faithfulness_runs=args.faithfulness_runs, ihvp=args.ihvp,
        damping=DEFAULT_DAMPING if args.damping is None else args.damping,
        lissa=LissaSettings(depth=args.lissa_depth), paper_signs=args.paper_signs, seed=args.seed, batch=args.batch,
        lds=LdsSettings(args.lds_subsets, args.lds_alpha, args.seed) if args.lds else None, ray=ray_settings(args),
    )
    backend = Backend(args.workspace, device=args.device, index_settings=_index_settings(args))
    report = run_evaluation(backend, settings, out, progress=not args.quiet)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nTable 3 (Sag, Lag x100; Ral in accuracy points)")
        print(report.table3.to_string(float_format="%.2f"))
        if len(report.table4):
            print("\nTable 4 (Spearman with GroundTruth x100)")
            print(report.table4.to_string(float_format="%.2f", na_rep="undefined"))
        if len(report.lds):
            print("\nLDS and span-LDS (x100; mean over tests, 95% CI over tests, then over tests and subsets)")
            print(lds_frame(report).to_string(float_format="%.1f"))
    print(f"\nReport: {out / 'report.md'}  (CSV, summary.json, k_curves.html/png in {out})")
    return 0


def cmd_combine(args) -> int:
    from .evaluate.combine import combine_reports

    summary = combine_reports(args.reports, args.out)
    print(f"{summary['n']} reports combined: {Path(args.out) / 'combined.md'}")
    if summary["left_out"]:
        print(f"left out (not in every report's per-test rows): {', '.join(summary['left_out'])}")
    return 0


def cmd_intervals(args) -> int:
    from .evaluate.render import pairs_summary, write_frames
    from .evaluate.report import FILES, load_report, with_intervals

    report, names = with_intervals(load_report(args.report)), ("table3_ci", "table3_pairs", "paper_sign")
    write_frames(report, names)
    absent = sorted(set(report.summary["settings"]["methods"]) - set(report.per_test.method))
    if absent:
        print(f"left out (no per-test rows): {', '.join(absent)}")
    print(pairs_summary(report) or "no pair of methods to test")
    print(f"written: {', '.join(FILES[a] for a in names if len(getattr(report, a)))} in {report.out_dir}")
    return 0


def cmd_fetch(args) -> int:
    from .fetch import FetchError, fetch_data

    try:
        paths = fetch_data(Path(args.dest), tuple(args.datasets))
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .ann import AnnSettings

    parser = _Parser(prog="python -m core", description="SpanLens: sample-based explanations with spans.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch-data", help="download MAMS and SentiHood from their public repositories")
    f.add_argument("--dest", required=True)
    f.add_argument("--datasets", nargs="+", default=["mams", "sentihood"], choices=["mams", "sentihood"])
    _prepare_parser(sub)
    _import_parser(sub)
    i = sub.add_parser("index", help="build (or resume) the gradient index of a prepared workspace")
    i.add_argument("--workspace", required=True)
    i.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA when present)")
    _index_options(i)
    _with_option(i)
    i.add_argument("--ann", metavar="METHODS",
                   help="also build FAISS indexes for `explain --approximate` over every matrix these methods read "
                        "(comma-separated names, or all: every method the workspace can run)")
    i.add_argument("--ann-rank", type=POSITIVE,
                   help=f"with --ann: dimensions each FAISS index projects the rows onto (default {AnnSettings.rank})")
    ray_options(i)
    _explain_parser(sub)
    _evaluate_parser(sub)
    c = sub.add_parser("combine", help="combine evaluation reports over classifier seeds (mean, sd per cell)",
                       description="Tables 3 and 4 and LDS of several reports made with the same evaluate options "
                                   "on workspaces prepared with different --seed (and one --data-seed, so that they "
                                   "share their tests): mean, sd, min, max per cell; each Sag/Lag and table-4 "
                                   "cell's 95% interval with seeds and tests both resampled, and every two methods' "
                                   "paired difference, which holds when both that bootstrap and a t-test over the "
                                   "seeds are significant after Holm over the cell's pairs.")
    c.add_argument("--reports", nargs="+", required=True, help="report folders (evaluate --out)")
    c.add_argument("--out", required=True, help="folder for combined.md and the CSV files")
    v = sub.add_parser("intervals", help="95%% intervals and paired tests of a report, from its per-test rows",
                       description="Derive table3_ci.csv, table3_pairs.csv and paper_sign.csv of an evaluation "
                                   "report again from its per_test.csv and the settings in its summary.json: a "
                                   "report written before every report had them gains them (report.md is left "
                                   "as it is).")
    v.add_argument("--report", required=True, help="report folder (evaluate --out)")
    return parser


COMMANDS = {"fetch-data": cmd_fetch, "prepare": cmd_prepare, "import": cmd_import, "index": cmd_index,
            "explain": cmd_explain, "evaluate": cmd_evaluate, "combine": cmd_combine,
            "intervals": cmd_intervals}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} -h`)\n")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # -h, or a usage error already printed
        return int(stop.code or 0)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError, sqlite3.Error) as err:
        if os.environ.get("SPANLENS_DEBUG", "").lower() in ("1", "true", "yes"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # no repr quotes
        print(f"error: {message}  (SPANLENS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
