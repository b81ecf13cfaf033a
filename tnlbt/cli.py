"""The ``tnlbt`` command: synth | preprocess | train | eval | plot | index | search | serve | demo | config.

Argument parsing lives here so ``tnlbt --help`` is instant; each subcommand's work is imported lazily from the
module that owns it (``cli_<name>(args) -> int``), so torch and Ray load only when a command needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tnlbt.config import SERVE_PROXIES, SERVE_TOPOLOGIES, ConfigError

# subcommand -> "module:function"; each function takes the parsed argparse.Namespace and returns an exit code.
COMMANDS = {
    "synth": "tnlbt.data.synthetic:cli_synth",
    "preprocess": "tnlbt.data.preprocess:cli_preprocess",
    "train": "tnlbt.train.ray_trainer:cli_train",
    "eval": "tnlbt.evaluate:cli_eval",
    "plot": "tnlbt.train.plots:cli_plot",
    "index": "tnlbt.index.embed:cli_index",
    "search": "tnlbt.index.search:cli_search",
    "serve": "tnlbt.serve.app:cli_serve",
    "demo": "tnlbt.demo:cli_demo",
    "config": "tnlbt.cli:cli_config",
}


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="preset name in configs/ (e.g. demo_cpu) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.epochs=3 model.embed_dim=256")


def _add_index_setting_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="HNSW / int8 setting (tnlbt/index/store.py IndexSettings), e.g. hnsw_ef=64 or "
                   "quantization=none; repeatable; over index.json's and TNLBT_INDEX_*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnlbt",
        description="TNLBT cross-modal recipe retrieval on Ray: offline data, preprocessing, large-batch "
        "training, evaluation, Qdrant indexing and a search API/UI.",
        epilog="Run `tnlbt demo` for the whole chain on a laptop; `tnlbt COMMAND --help` for details.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("synth", help="write an offline dataset in Recipe1M's exact layout",
                       description="Generate recipes and procedurally rendered photos grounded in each recipe, "
                       "written as layer1.json, layer2.json, det_ingrs.json and the images/{split}/a/b/c/d tree.")
    p.add_argument("--out", required=True, help="output folder (Recipe1M layout)")
    p.add_argument("--recipes", type=int, default=2000, help="number of recipes (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (0 = all cores)")
    p.add_argument("--image-size", type=int, default=256, help="photo size in pixels (default 256)")
    p.add_argument("--difficulty", type=float, default=1.0,
                   help="0 = clean studio photos, 1 = default clutter/noise, 2 = hard")
    p.add_argument("--no-image-share", type=float, default=0.25,
                   help="share of train recipes written without photos (recipe-only self-supervision)")
    p.add_argument("--preview", metavar="PNG", help="also write a contact sheet of recipes next to their photos")
    p.add_argument("--catalog", metavar="JSONL", default=None,
                   help="also write the test split as a `tnlbt index --catalog` file (photo paths relative to "
                   "OUT/images)")
    p.add_argument("--catalog-splits", default="test", help="splits written to --catalog, comma-separated")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")

    p = sub.add_parser("preprocess", help="Recipe1M layout -> Parquet shards + vocab (Ray Data)",
                       description="Stream layer1/layer2/det_ingrs, validate, tokenise (vocabulary from paired "
                       "train recipes), decode and resize photos, write {out}/{train,val,test}/*.parquet, "
                       "vocab.json, ingredients.json, stats.json. Bad records are skipped and counted.")
    p.add_argument("--data", required=True, help="Recipe1M-layout folder (layer1.json, layer2.json, ...)")
    p.add_argument("--images", default="", help="image tree root (default: data.image_root if set, else DATA/images)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="redo finished work")
    p.add_argument("--num-cpus", type=int, default=0, help="logical CPUs for a local Ray (0 = all)")
    p.add_argument("--allow-partial", action="store_true",
                   help="keep the records before a JSON error (a truncated layer1.json) instead of failing; the "
                   "error is listed in stats.json parse_errors")
    _add_config_args(p)

    p = sub.add_parser("train", help="large-batch data-parallel training on Ray Train",
                       description="Ray Train V2 TorchTrainer: global negatives, feature-cache accumulation, "
                       "margin schedule, checkpoints, resume and worker fault tolerance.")
    p.add_argument("--data", default=None, help="preprocessed folder (overrides data.processed_dir)")
    p.add_argument("--name", default=None, help="run name (overrides train.run_name); rerun to resume")
    p.add_argument("--resume", default=None, metavar="PATH", help="start from this checkpoint directory")
    p.add_argument("--no-ray", action="store_true", help="run the plain PyTorch loop in this process")
    _add_config_args(p, default="demo_cpu")

    p = sub.add_parser("eval", help="medR and R@1/5/10, 1k and 10k bags, both directions",
                       description="Embed a split with the run's best checkpoint and write metrics.json "
                       "and the papers' table.")
    p.add_argument("--run", required=True, help="run directory (runs/NAME) or checkpoint directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", default=None, help="preprocessed folder (default: the run's config)")
    p.add_argument("--bags", type=int, default=None, help="bags per setting (default: eval.n_bags)")
    p.add_argument("--mode", choices=["random", "fixed"], default=None, help="bag protocol")
    p.add_argument("--ties", choices=["optimistic", "pessimistic"], default=None,
                   help="rank rule for exact ties: optimistic = 1 + #strictly closer (default, H-T's medR), "
                   "pessimistic = #closer or equal (default: the run's eval.ties)")
    p.add_argument("--query-forms", default="all", metavar="FORMS",
                   help="also score recipes cut to a query form: all (default: full, title, ingredients, "
                   "title+ingredients, instructions), full (whole recipes only), or a comma list")

    p = sub.add_parser("plot", help="training curves of a run as PNG")
    p.add_argument("run", help="run directory (runs/NAME)")
    p.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")

    p = sub.add_parser("index", help="embed a split (or your own catalog) with Ray Data and load it into Qdrant",
                       description="Embed a processed split, or a JSON Lines catalog of your own recipes and "
                       "photos (--catalog), publish it as a new index version if it passes the gate "
                       "(canary recall not worse than the live version's by more than --gate-margin; point "
                       "counts as embedded), and record its lineage. Exit 3 when the gate refuses.")
    p.add_argument("--run", required=True, help="run directory or checkpoint directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--data", default=None, help="preprocessed folder (default: the run's config)")
    p.add_argument("--catalog", default=None, metavar="JSONL",
                   help="index this catalog instead of a split: one recipe per line with id, title, ingredients, "
                   "instructions, optional photos (paths under --photos) and metadata (README: catalog format)")
    p.add_argument("--photos", default=None, metavar="DIR",
                   help="folder the catalog's photo paths are relative to (default: the catalog's folder); its "
                   "photo files that no recipe names are indexed as photos without a recipe")
    p.add_argument("--no-loose-photos", action="store_true",
                   help="index only the photos the catalog names, not the other files under --photos")
    p.add_argument("--canary", default=None, metavar="JSONL",
                   help='gate canary: lines of {"recipe_id": ..., "photo_ids": [...]} (default: a sample of '
                   "the indexed recipe/photo pairs)")
    p.add_argument("--gate-margin", type=float, default=None,
                   help="allowed recall@k drop against the live version (default index.gate_margin, 0.05)")
    p.add_argument("--force", action="store_true", help="publish even when the gate refuses (recorded)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--qdrant-url", default=None, help="Qdrant server URL (API key from QDRANT_API_KEY)")
    g.add_argument("--qdrant-path", default=None, help="embedded store folder (default RUN/edge or RUN/qdrant)")
    p.add_argument("--store", choices=["auto", "qdrant", "edge"], default="auto",
                   help="vector store: auto = a Qdrant server with --qdrant-url, else the embedded "
                   "qdrant-edge engine (HNSW) when installed, else qdrant-client local mode "
                   "(numbers: bench/results/index.json)")
    p.add_argument("--keep", type=int, default=2, help="index versions to keep")
    p.add_argument("--actors", type=int, default=0,
                   help="embedding actors (0 = size the pool from what the cluster has now); on an autoscaling "
                   "cluster a larger pool is demand that adds nodes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="embed on GPUs (cuda: one per actor, waits for GPU nodes), CPUs, or GPUs if present now")
    _add_index_setting_arg(p)

    p = sub.add_parser("search", help="query the index from the terminal")
    p.add_argument("--run", required=True, help="run directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="recipe text (title, ingredients, instructions)")
    g.add_argument("--image", help="path to a food photo")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--include", action="append", metavar="INGREDIENTS",
                   help="only recipes with these ingredients (comma separated; repeatable)")
    p.add_argument("--exclude", action="append", metavar="INGREDIENTS",
                   help="no recipe with any of these ingredients (comma separated; repeatable)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=None,
                   help="text queries: rank by dense + title/ingredient words (default) or dense only (--no-hybrid)")
    p.add_argument("--qdrant-url", default=None)
    p.add_argument("--qdrant-path", default=None)
    _add_index_setting_arg(p)

    p = sub.add_parser("serve", help="run the HTTP API and the Gradio UI on Ray Serve")
    p.add_argument("--run", required=True, help="run directory (indexed)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--qdrant-url", default=None)
    p.add_argument("--qdrant-path", default=None)
    p.add_argument("--gpus", type=float, default=0.0,
                   help="GPU share per encoder replica (0 = CPU; 0.5 = text and image encoder on one GPU)")
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=None,
                   help="default ranking of text searches that do not say: hybrid (default) or --no-hybrid (dense)")
    p.add_argument("--topology", choices=SERVE_TOPOLOGIES, default=None,
                   help="auto (default): encoders + index inside the API replica with an embedded store, "
                        "separate deployments with a Qdrant server")
    p.add_argument("--proxy", choices=SERVE_PROXIES, default=None,
                   help="Serve's HTTP proxy (default TNLBT_SERVE_PROXY, else python); README 'Capacity'")
    _add_index_setting_arg(p)

    p = sub.add_parser("demo", help="the whole chain on a laptop: synth -> ... -> serve",
                       description="synth (small) -> preprocess -> train -> eval -> index -> serve; reruns "
                       "reuse finished stages.")
    p.add_argument("--config", default="demo_cpu", help="preset (default demo_cpu)")
    p.add_argument("--workdir", default="work/demo", help="where data and runs go (default work/demo)")
    p.add_argument("--recipes", type=int, default=None, help="offline dataset size (default from preset)")
    p.add_argument("--no-serve", action="store_true", help="stop after indexing")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")

    p = sub.add_parser("config", help="print a preset with overrides applied, validated, as JSON")
    _add_config_args(p)
    return parser


def cli_config(args: argparse.Namespace) -> int:
    from tnlbt.config import Config

    print(Config.load(args.config, args.overrides).to_json())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module_name, func_name = COMMANDS[args.command].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(args) or 0)
    except ConfigError as e:
        print(f"tnlbt {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        # Expected user errors (missing data, bad arguments) get one clear line, not a traceback.
        if args.verbose:
            raise
        print(f"tnlbt {args.command}: {e} (tnlbt -v {args.command} ... shows the traceback)", file=sys.stderr)
        return 2
    except Exception as e:
        from tnlbt.storage import error_line, out_of_space

        full = out_of_space(e)
        if full is None or args.verbose:
            raise
        print(f"tnlbt {args.command}: out of disk space ({error_line(full)}); free some space and run the same "
              "command again: finished work is kept and reused, nothing half-written is read back", file=sys.stderr)
        return EXIT_NO_SPACE


EXIT_NO_SPACE = 28  # errno ENOSPC: scripts can tell a full disk from a bad argument (2)



if __name__ == "__main__":
    sys.exit(main())
