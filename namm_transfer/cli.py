"""The ``namm-transfer`` command line.

    namm-transfer eval --target {language,decision-transformer,video-llava} [--model M]
                       [--policies full,namm,h2o,tova,l2,streaming,random] [--namm NAME_OR_PATH]
                       [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                       [--output NAME.json] [--seed N] [--limit N] [target options]
                       (default output: runs/<target>/<name>.json, relative to the current folder)
    namm-transfer evolve ...              evolve a NAMM (CMA-ES) on language tasks
    namm-transfer rl collect|derive-po|train ...  behaviour data and Decision Transformer training
    namm-transfer video train ...         the small offline video model
    namm-transfer models list|fetch NAME  offline and hub model sources
    namm-transfer report                  rebuild README tables from results files; --merge shards
    namm-transfer info                    versions, registered policies, adapters, checkpoints

Contract for the modules a command dispatches to (``EVAL_TARGETS`` and ``COMMANDS`` below):

- The module exposes ``add_arguments(parser: argparse.ArgumentParser) -> None`` and
  ``main(args: argparse.Namespace) -> int``.
- ``add_arguments`` receives the command's own subparser. For ``eval`` that parser already holds
  the common options (``--target --model --policies --namm --device --dtype --output --seed
  --limit --log-level``); the target adds only its own options, and may change the defaults of
  the common ones with ``parser.set_defaults(model=..., namm=..., dtype=..., output=...)``.
- ``main`` receives the parsed namespace. Besides the options it holds ``command`` (the exact
  command line as one string, for the results file), ``argv`` (the arguments as a list) and
  ``subcommand``. For ``eval``: ``target`` (str), ``model`` (str or None: the target's default),
  ``policies`` (list of str, in the order given, duplicates removed), ``namm`` (str or None),
  ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None: cuda when available), ``dtype`` (str or
  None: the target's default), ``output`` (str: ``runs/<target>/<name>.json`` unless given, see
  :func:`namm_transfer.evals.args.default_output`), ``seed`` (int), ``limit`` (int or None),
  ``log_level`` (str; logging is already configured). ``main`` returns the exit code (None counts
  as 0); it prints results for people, logs the rest. After a successful eval the CLI prints the
  run's rows next to the committed reference result of the same name (``results/<name>.json`` of
  the checkout the package runs from), or says that there is none.
- Every parser is a :class:`namm_transfer.evals.args.StrictParser`: abbreviated options are
  refused, and an unknown option's error names the nearest valid one.
- The module must not import torch, transformers or other heavy packages at import time (import
  them inside ``main``): ``namm-transfer eval --target X --help`` imports the module to show its
  options and must stay fast and work without a GPU stack.

A command whose module is missing, or whose optional dependencies are not installed, exits with
code 2 and says so (and which extra to install); its ``--help`` still works.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .evals.args import StrictParser, default_output, output_name, positive_int, reference_summary, repository_root

__all__ = ["main", "build_parser", "Plugin", "EVAL_TARGETS", "COMMANDS", "DEFAULT_POLICIES"]

logger = logging.getLogger(__name__)

DEFAULT_POLICIES = "full,namm,h2o,tova,l2,streaming,random"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Plugin:
    """Where a command's options and entry point live."""

    module: str
    """Dotted module with ``add_arguments(parser)`` and ``main(args) -> int``."""
    label: str
    """How messages name it: ``"target language"``, ``"command evolve"``."""
    extra: str | None = None
    """The pip extra that installs its optional dependencies."""


EVAL_TARGETS: dict[str, Plugin] = {
    "language": Plugin("namm_transfer.evals.language.run", "target language", "lm"),
    "decision-transformer": Plugin("namm_transfer.evals.offline_rl.run", "target decision-transformer", "rl"),
    "video-llava": Plugin("namm_transfer.evals.video_qa.run", "target video-llava", "video"),
}

COMMANDS: dict[tuple[str, ...], Plugin] = {
    ("evolve",): Plugin("namm_transfer.evolution.cli", "command evolve", "lm"),
    ("rl", "collect"): Plugin("namm_transfer.evals.offline_rl.cli_collect", "command rl collect", "rl"),
    ("rl", "derive-po"): Plugin("namm_transfer.evals.offline_rl.pomdp", "command rl derive-po", "rl"),
    ("rl", "train"): Plugin("namm_transfer.evals.offline_rl.cli_train", "command rl train", "rl"),
    ("video", "train"): Plugin("namm_transfer.evals.video_qa.cli_train", "command video train", "video"),
}

_HELP = {
    ("evolve",): "evolve a NAMM (CMA-ES) on language tasks",
    ("rl", "collect"): "collect behaviour data for offline RL",
    ("rl", "derive-po"): "derive a positions-only (partially observable) dataset from a collected one",
    ("rl", "train"): "train a Decision Transformer on collected data",
    ("video", "train"): "train the small offline video model",
}


class _Unavailable(Exception):
    pass


def load_plugin(plugin: Plugin) -> ModuleType:
    """Import a command's module; raise ``_Unavailable`` with a message for people when it cannot be used."""
    try:
        module = importlib.import_module(plugin.module)
    except ImportError as err:
        missing = getattr(err, "name", None) or ""
        if missing and (plugin.module == missing or plugin.module.startswith(missing + ".")):
            reason = f"module {plugin.module} is missing"
        elif missing:
            hint = f"pip install 'namm-transfer[{plugin.extra}]'" if plugin.extra else f"pip install {missing}"
            reason = f"it needs the package {missing!r}, which is not installed ({hint})"
        else:
            reason = str(err)
        raise _Unavailable(f"{plugin.label} is not available in this build: {reason}") from err
    lacking = [name for name in ("add_arguments", "main") if not callable(getattr(module, name, None))]
    if lacking:
        raise _Unavailable(
            f"{plugin.label} is not available in this build: {plugin.module} has no "
            + " or ".join(f"{name}()" for name in lacking)
        )
    return module


# ----------------------------------------------------------------------------------------------
# argument types


def _policy_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one policy, e.g. full,namm,h2o")
    return list(dict.fromkeys(names))


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, not {text!r}")
    return text


def _cuda_problem(device: str) -> str | None:
    """Why ``device`` (cuda or cuda:N) cannot be used here, or None."""
    import torch

    if not torch.cuda.is_available():
        return f"CUDA is not available on this machine (torch {torch.__version__}; no GPU, driver or CUDA build)"
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


# ----------------------------------------------------------------------------------------------
# parser


class _QuietParser(argparse.ArgumentParser):
    """Pre-parser that never prints or exits."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _Unavailable(message)


def _command_words(argv: Sequence[str]) -> list[str]:
    """The first (up to two) command words, skipping ``--log-level X``: ``['rl', 'collect']``."""
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        token = argv[i]
        if token == "--log-level":
            i += 2
            continue
        if token.startswith("--log-level="):
            i += 1
            continue
        if token.startswith("-"):
            break
        words.append(token)
        i += 1
    return words


def _eval_target(argv: Sequence[str]) -> str | None:
    pre = _QuietParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--target")
    try:
        ns, _ = pre.parse_known_args(list(argv))
    except _Unavailable:
        return None
    return ns.target


def _log_parent(top: bool) -> argparse.ArgumentParser:
    parent = StrictParser(add_help=False)
    parent.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO" if top else argparse.SUPPRESS,
        help="logging level (default: INFO)",
    )
    return parent


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, choices=list(EVAL_TARGETS), help="what to evaluate")
    parser.add_argument("--model", help="host model: hub id, local path or offline name (default: the target's)")
    parser.add_argument(
        "--policies",
        type=_policy_list,
        default=DEFAULT_POLICIES,
        help=f"comma-separated memory policies (default: {DEFAULT_POLICIES})",
    )
    parser.add_argument("--namm", help="shipped NAMM name (see `namm-transfer info`) or checkpoint path")
    parser.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="(default: the target's)")
    parser.add_argument(
        "--output",
        help="results summary NAME.json; NAME.jsonl is written next to it, and the same command resumes from it "
        "(default: runs/<target>/<target>.json, video-llava: runs/video-llava/video-llava-<bench>.json, relative to "
        "the current folder; the committed results/ files are written only when named here)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--limit", type=positive_int, help="evaluate at most N samples / episodes / prompts")


def build_parser(argv: Sequence[str] = ()) -> tuple[argparse.ArgumentParser, ModuleType | None, str | None]:
    """The full parser for ``argv``: ``(parser, module of the selected command, why it is unavailable)``.

    Only the selected command's module is imported (so ``--help`` stays cheap); the other commands
    are listed with their common options only.
    """
    argv = list(argv)
    words = _command_words(argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    selected: ModuleType | None = None
    problem: str | None = None

    def attach(sub: argparse.ArgumentParser, plugin: Plugin) -> None:
        nonlocal selected, problem
        try:
            selected = load_plugin(plugin)
        except _Unavailable as err:
            problem = str(err)
            sub.epilog = f"note: {problem}"
            return
        selected.add_arguments(sub)

    child = _log_parent(top=False)
    parser = StrictParser(
        prog="namm-transfer",
        description="Attach a frozen, language-trained NAMM to other transformers and evaluate the transfer.",
        parents=[_log_parent(top=True)],
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)

    # eval
    ev = sub.add_parser(
        "eval",
        parents=[child],
        help="evaluate memory policies on a target; writes runs/<target>/NAME.json(l)",
        description="Evaluate memory policies on one target. `namm-transfer eval --target X --help` "
        "also lists the target's own options.",
    )
    _add_eval_options(ev)
    if words[:1] == ["eval"]:
        target = _eval_target(argv[argv.index("eval") + 1 :])
        if target in EVAL_TARGETS:
            attach(ev, EVAL_TARGETS[target])

    # evolve
    evo = sub.add_parser("evolve", parents=[child], help=_HELP[("evolve",)], description=_HELP[("evolve",)])
    if words[:1] == ["evolve"]:
        attach(evo, COMMANDS[("evolve",)])

    # rl / video (two-word commands)
    for group, title in (("rl", "offline RL data and Decision Transformer training"), ("video", "video model")):
        gp = sub.add_parser(group, parents=[child], help=title, description=title)
        gsub = gp.add_subparsers(dest="action", metavar="ACTION", required=True)
        for key, plugin in COMMANDS.items():
            if key[0] != group:
                continue
            sp = gsub.add_parser(key[1], parents=[child], help=_HELP[key], description=_HELP[key])
            if tuple(words) == key:
                attach(sp, plugin)

    # models
    models = sub.add_parser("models", parents=[child], help="offline and hub model sources")
    msub = models.add_subparsers(dest="action", metavar="ACTION", required=True)
    msub.add_parser("list", parents=[child], help="list known model sources")
    fetch = msub.add_parser("fetch", parents=[child], help="download or build a model source")
    fetch.add_argument("name", help="model name from `namm-transfer models list`")
    msub.add_parser(
        "info", parents=[child], help="where a model source comes from and what a fetch checks"
    ).add_argument("name", help="model name from `namm-transfer models list`")

    # report
    from . import report

    rep = sub.add_parser(
        "report",
        parents=[child],
        help="rebuild README tables from results files; merge sharded runs",
        description="Rebuild the README's results tables from results/NAME.json summaries, or merge the "
        "JSONL files of a sharded run (--merge).",
    )
    report.add_arguments(rep)

    # info
    sub.add_parser("info", parents=[child], help="versions, registered policies, adapters, NAMM checkpoints")

    return parser, selected, (None if wants_help else problem)


# ----------------------------------------------------------------------------------------------
# commands implemented here


def _info() -> int:
    from .results import collect_versions

    versions = collect_versions()
    for name in ("namm_transfer", "python", "torch", "transformers"):
        print(f"{name:<14} {versions.get(name) or 'not installed'}")
    try:
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            print(f"{'cuda':<14} available: {names} (CUDA {torch.version.cuda})")
        else:
            print(f"{'cuda':<14} not available")
    except ImportError:
        print(f"{'cuda':<14} unknown (torch not installed)")
    try:
        from .registry import list_adapters, list_policies

        print(f"{'policies':<14} {', '.join(list_policies())}")
        print(f"{'adapters':<14} {', '.join(list_adapters())}")
    except Exception as err:  # info must report, not crash
        print(f"{'registry':<14} unavailable ({type(err).__name__}: {err})")
    try:
        from .checkpoint import list_namms

        namms = list(list_namms())
        print(f"{'NAMMs':<14} {_listing(namms) if namms else 'none shipped'}")
    except ImportError as err:
        print(f"{'NAMMs':<14} unavailable ({err})")
    except Exception as err:
        print(f"{'NAMMs':<14} unavailable ({type(err).__name__}: {err})")
    for label, listing in (("DTs", _shipped_dts), ("video models", _shipped_video_models)):
        try:
            shipped = listing()
            print(f"{label:<14} {', '.join(shipped) if shipped else 'none shipped'}")
        except Exception as err:  # an extra not installed (rl, video), or a broken install: report, do not crash
            print(f"{label:<14} unavailable ({type(err).__name__}: {err})")
    return 0


def _shipped_dts() -> list[str]:
    from .evals.offline_rl.train import shipped_dt_dir

    return sorted(f"shipped:{p.name}" for p in shipped_dt_dir().iterdir() if (p / "config.json").is_file())


def _shipped_video_models() -> list[str]:
    from .evals.video_qa.model import is_video_model_folder, shipped_video_dir

    return sorted(p.name for p in shipped_video_dir().iterdir() if is_video_model_folder(p))


def _listing(items: Sequence[Any]) -> str:
    out = []
    for item in items:
        if isinstance(item, dict):
            name = item.get("name", "?")
            rest = ", ".join(f"{k}={v}" for k, v in item.items() if k != "name")
            out.append(f"{name} ({rest})" if rest else str(name))
        else:
            out.append(str(item))
    return ", ".join(out)


def _models(args: argparse.Namespace) -> int:
    try:
        models = importlib.import_module("namm_transfer.models")
    except ImportError as err:
        print(f"error: command models is not available in this build: {err}", file=sys.stderr)
        return 2
    if args.action == "list":
        if not callable(getattr(models, "list_models", None)):
            print("error: command models list is not available in this build: no list_models()", file=sys.stderr)
            return 2
        for item in models.list_models():
            if isinstance(item, dict):
                name = item.get("name", "?")
                rest = "  ".join(f"{k}={v}" for k, v in item.items() if k != "name")
                print(f"{name}  {rest}".rstrip())
            else:
                print(item)
        return 0
    if args.action == "info":
        print(models.model_card(args.name))
        return 0
    if not callable(getattr(models, "fetch", None)):
        print("error: command models fetch is not available in this build: no fetch()", file=sys.stderr)
        return 2
    result = models.fetch(args.name)
    if result is not None:
        print(result)
    return 0


def _print_reference(args: argparse.Namespace) -> None:
    """Print the finished eval's rows next to the committed reference result of the same name, or say there is
    none. Nothing for a shard of a sharded run (its summary is the rank's) or a run that wrote no summary."""
    from .report import render_rows
    from .results import results_paths, shard_info, signature_differences

    if shard_info()[1] > 1:
        return
    summary_path = results_paths(args.output)[1]
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
        return
    names = list(dict.fromkeys([summary_path.stem, output_name(args.target, vars(args))]))
    reference = reference_summary(names)
    print(f"\nthis run: {summary_path}")
    print(render_rows(summary["rows"]))
    if reference is None:
        root = repository_root()
        where = f"results/ of {root}" if root is not None else "an installed package (not a checkout)"
        wanted = " or ".join(f"{n}.json" for n in names)
        print(f"\nno committed reference result to compare with: no {wanted} in {where}")
        return
    if reference.resolve() == summary_path.resolve():
        print(f"\nthis run wrote the committed reference result {reference} itself")
        return
    try:
        ref = json.loads(reference.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        print(f"\ncommitted reference result {reference} is unreadable ({err})")
        return
    finished = str(ref.get("finished") or "?")[:10]
    print(f"\ncommitted reference: {reference} (`{ref.get('command', '?')}`, finished {finished})")
    print(render_rows(ref.get("rows") or []))
    diffs = signature_differences(ref, summary)
    if diffs:
        print(f"note: the reference ran with other settings ({', '.join(diffs)}); its numbers are not this run's")


# ----------------------------------------------------------------------------------------------
# entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``namm-transfer`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module, problem = build_parser(argv)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    args.command = shlex.join(["namm-transfer", *argv])
    args.argv = argv

    from .models import ModelNotAvailableError
    from .registry import UnsupportedModelError
    from .results import ResultsFileError

    device = getattr(args, "device", None)
    if isinstance(device, str) and device.startswith("cuda"):
        problem = _cuda_problem(device)
        if problem:
            print(f"error: --device {device}: {problem}; use --device cpu", file=sys.stderr)
            return 2
    try:
        if args.subcommand == "info":
            return _info()
        if args.subcommand == "models":
            return _models(args)
        if args.subcommand == "report":
            from . import report

            return int(report.main(args) or 0)
        if args.subcommand == "eval" and args.output is None:
            args.output = default_output(args.target, vars(args))
        if module is None:  # cannot happen: build_parser loads the selected command's module
            raise RuntimeError(f"no module loaded for {args.subcommand}")
        code = int(module.main(args) or 0)
        if args.subcommand == "eval" and code == 0:
            _print_reference(args)
        return code
    except (ResultsFileError, ModelNotAvailableError, UnsupportedModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional dependency the command imports only when it runs
        missing = (err.name or "").split(".")[0]
        name = getattr(module, "__name__", None)
        plugin = next((p for p in [*EVAL_TARGETS.values(), *COMMANDS.values()] if p.module == name), None)
        if not missing or missing == "namm_transfer" or plugin is None:
            raise
        hint = f"pip install 'namm-transfer[{plugin.extra}]'" if plugin.extra else f"pip install {missing}"
        print(f"error: {plugin.label} needs the package {missing!r}, which is not installed ({hint})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" ({args.output}l)" if args.subcommand == "eval" and str(args.output).endswith(".json") else ""
        print(f"interrupted; rerun the same command to resume from the results file{where}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
