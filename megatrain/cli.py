"""`megatrain {pretrain,rl,ttt,sweep,generate,bench,tokenizer,config,export,import,reshard,analyze,plan}`.

User errors (MegatrainError) end as one line on stderr and exit code 2; no traceback.
`megatrain pretrain` (and `rl`, `ttt`, `plan --build`) runs in this process for one process, or starts
torchrun's elastic agent for several, whose workers run the command line exactly as typed; under a
launcher (torchrun / deepspeed set WORLD_SIZE) it runs the worker directly. The launcher passes
SIGTERM / SIGUSR1 on to its workers and exits 0 once they have checkpointed (_spawn_torchrun).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from megatrain.errors import MegatrainError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with exit code 2 (as it does) but names the program."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"megatrain: error: {message}\n")


def _add_pretrain(sub):
    p = sub.add_parser("pretrain", help="pretrain a model (one YAML config plus a.b=c overrides)")
    p.add_argument("--config", "-c", help="YAML run config (launch/configs/*.yaml)")
    p.add_argument(
        "--deepspeed", dest="deepspeed_json", help="DeepSpeed JSON merged into the config's deepspeed section"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from run.dir's latest checkpoint (a fresh start if it has none)"
    )
    p.add_argument(
        "--resume-from",
        metavar="PATH",
        default=None,
        help="continue from this checkpoint directory (or this run directory's latest)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes to start on this machine (default: the number of GPUs, or 1 on CPU)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="config overrides such as train.steps=100 model.dim=256")
    return p


def _add_rl(sub):
    p = sub.add_parser("rl", help="RL / SFT / SFT->RL / parallel averaging from pretraining checkpoints (rl.* keys)")
    p.add_argument("--config", "-c", help="YAML run config (launch/configs/rl-*.yaml)")
    p.add_argument(
        "--deepspeed", dest="deepspeed_json", help="DeepSpeed JSON merged into the config's deepspeed section"
    )
    p.add_argument("--resume", action="store_true", help="continue the RL run in run.dir (finished sub-runs are kept)")
    p.add_argument("--resume-from", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop each excursion after this many iterations with a checkpoint (preemptible jobs, tests)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes to start on this machine (default: the number of GPUs, or 1 on CPU)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as rl.group_size=8 rl.init=runs/x")


def _cmd_rl(args) -> int:
    from megatrain.config import load_config
    from megatrain.rl.job import preflight, rl

    cfg = load_config(args.config, args.overrides, args.deepspeed_json)
    if args.stop_after is not None and args.stop_after < 1:
        raise MegatrainError(f"--stop-after must be >= 1, got {args.stop_after}")
    if _under_launcher():
        rl(cfg, resume=args.resume, stop_after=args.stop_after)
        return 0
    nproc = _process_count(args)
    if nproc == 1:
        rl(cfg, resume=args.resume, stop_after=args.stop_after)
        return 0
    preflight(cfg, args.resume, nproc)  # a bad config is one line, not N
    return _spawn_torchrun(nproc, args.argv, run_dir=cfg.run.dir)


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer on local text/jsonl/parquet files")
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories ('embedded' for the corpus)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet records")


def _add_config(sub):
    p = sub.add_parser("config", help="print the resolved config, or the reference of every key")
    p.add_argument("--config", "-c")
    p.add_argument("--reference", action="store_true", help="print the markdown table of every key")
    p.add_argument("overrides", nargs="*")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="megatrain", description="Distributed LLM pretraining on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_pretrain(sub)
    _add_rl(sub)
    _add_tokenizer(sub)
    _add_config(sub)
    p = sub.add_parser("export", help="write a run's weights as a Hugging Face Llama folder (safetensors)")
    p.add_argument("path", help="run directory or checkpoint directory")
    p.add_argument("--output", "-o", required=True, help="output folder (must not exist or be empty)")
    p = sub.add_parser(
        "reshard",
        help="convert a ZeRO 1/2 checkpoint to DeepSpeed's universal form, so it resumes "
        "at any parallel.tensor, parallel.pipeline, parallel.context and process count",
    )
    p.add_argument("path", help="run directory (its latest checkpoint) or checkpoint directory")
    _add_generate(sub)
    _add_ttt(sub)
    _add_analyze(sub)
    _add_import(sub)
    _add_bench(sub)
    _add_sweep(sub)
    _add_plan(sub)
    return parser


def _add_analyze(sub):
    p = sub.add_parser(
        "analyze",
        help="research instruments on a run's checkpoints: spectra, loss landscape, "
        "interpolation, CKA, exposure index (markdown + PNG + tensorboard)",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--vs", metavar="OTHER_RUN", default=None, help="a second run to compare with")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated instruments (default all): spectra,landscape,interpolation,cka,exposure",
    )
    p.add_argument("--checkpoint", default=None, help="step_N (or N, or a path) of RUN (default: its latest)")
    p.add_argument("--vs-checkpoint", default=None, help="step_N of OTHER_RUN (default: its latest)")
    p.add_argument(
        "--base",
        default="init",
        choices=["init", "first"],
        help="W_0 of the update spectra: init (rebuilt from the run's seed) or the first checkpoint",
    )
    p.add_argument(
        "--phrases",
        default=None,
        help='exposure: file of phrases / evaluation items, one per line (.jsonl: a "text" field per line)',
    )
    p.add_argument("--ngram", type=int, default=8, help="exposure: n-gram length of the index")
    p.add_argument("--directions", type=int, default=2, help="landscape: random filter-normalised directions")
    p.add_argument("--components", type=int, default=2, help="landscape: principal directions of the trajectory")
    p.add_argument("--points", type=int, default=21, help="landscape: grid points per curve (odd)")
    p.add_argument("--radius", type=float, default=0.2, help="landscape: sharpness radius (fraction of the grid)")
    p.add_argument("--interp-points", type=int, default=11, help="interpolation: points from 0 to 1")
    p.add_argument("--batches", type=int, default=2, help="held-out micro-batches for the loss and CKA")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per held-out micro-batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--out", default=None, help="output folder (default RUN/analysis, or RUN/analysis/vs-OTHER)")
    p.add_argument("--no-tensorboard", action="store_true", help="skip the tensorboard events")


def _cmd_analyze(args) -> int:
    from megatrain.analysis.analyze import INSTRUMENTS, AnalyzeOptions, analyze
    from megatrain.analysis.report import default_output, write_report

    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else INSTRUMENTS
    opts = AnalyzeOptions(
        only=only,
        checkpoint=args.checkpoint,
        vs_checkpoint=args.vs_checkpoint,
        base=args.base,
        directions=args.directions,
        components=args.components,
        points=args.points,
        radius=args.radius,
        interp_points=args.interp_points,
        batches=args.batches,
        micro_batch=args.micro_batch,
        seed=args.seed,
        phrases=args.phrases,
        ngram=args.ngram,
    )
    results = analyze(args.run, args.vs, opts)
    path = write_report(results, args.out or default_output(args.run, args.vs), tensorboard=not args.no_tensorboard)
    print(f"wrote {path}")
    return 0


def _add_import(sub):
    p = sub.add_parser(
        "import",
        help="make a run directory from a local Hugging Face Llama folder (safetensors, "
        "sharded or not) to continue pretraining, run RL or qTTT",
    )
    p.add_argument("path", help="Hugging Face folder: config.json, model.safetensors (or its index and shards)")
    p.add_argument("--output", "-o", required=True, help="run directory to create (must not exist or be empty)")
    p.add_argument(
        "--tokenizer", default=None, help="sentencepiece .model to use (default: the folder's tokenizer.model)"
    )


def _cmd_import(args) -> int:
    from megatrain.engine.hf_import import import_hf_llama

    out = import_hf_llama(args.path, args.output, tokenizer=args.tokenizer)
    print(
        f"wrote run directory {out}; continue with: megatrain pretrain --config {out}/config.yaml --resume "
        f"(or rl.init={out}, ttt.init={out})"
    )
    return 0


def _add_bench(sub):
    p = sub.add_parser(
        "bench",
        help="training throughput of a config over settings, against HF+DeepSpeed and plain "
        "PyTorch on the same model and batches (docs/benchmarks.md)",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML run config (launch/configs/*.yaml); optional")
    p.add_argument(
        "overrides", nargs="*", help="config overrides for every setting, such as data.seq_len=256 (before --settings)"
    )
    p.add_argument(
        "--settings",
        nargs="+",
        action="extend",
        default=None,
        metavar="SETTING",
        help="settings to compare, each a comma list such as mb=4,zero=2,ac=1,compile=1,kernels=torch,tp=2 "
        "(or full config keys); default: the config as it is",
    )
    p.add_argument(
        "--deepspeed", dest="deepspeed_json", help="DeepSpeed JSON merged into the config's deepspeed section"
    )
    p.add_argument("--steps", type=int, default=20, help="measured steps per side and setting")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps per side first")
    p.add_argument("--block", type=int, default=5, help="steps per alternating measurement block")
    p.add_argument(
        "--breakdown-steps",
        type=int,
        default=2,
        help="profiled steps per side for the forward/backward/optimizer/communication breakdown (0: none)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also write torch.profiler op tables of STEPS steps per side next to the results",
    )
    p.add_argument("--no-baseline", action="store_true", help="leave out the HF LlamaForCausalLM + DeepSpeed side")
    p.add_argument("--no-plain", action="store_true", help="leave out the plain PyTorch side")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results folder")
    p.add_argument("--tag", default=None, help="results file stem (default: bench-CONFIG-cpu|gpu)")
    p.add_argument("--plot", action="store_true", help="also draw tokens/s and memory per setting (STEM.png)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall time, or by each process's CPU time (steadier on a shared CPU machine)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads per process (default: cores / processes)"
    )


def _cmd_bench(args) -> int:
    from megatrain.bench import parse_settings, run_bench

    config, overrides = _config_slot(args.config, None, args.overrides, "bench")
    run_bench(
        config,
        overrides,
        parse_settings(args.settings),
        out_dir=args.out,
        stem=args.tag,
        warmup=args.warmup,
        steps=args.steps,
        block=args.block,
        breakdown_steps=args.breakdown_steps,
        profile_steps=args.profile,
        baseline=not args.no_baseline,
        plain=not args.no_plain,
        plot=args.plot,
        deepspeed_json=args.deepspeed_json,
        clock=args.clock,
        threads=args.threads,
        command="megatrain " + " ".join(sys.argv[1:]),
    )
    return 0


# ---- megatrain plan (per-rank memory plan; --build measures a real sharded build) -------------------
def _add_plan(sub):
    p = sub.add_parser(
        "plan",
        help="per-rank memory plan of a layout (weights, gradients, optimizer, activations); "
        "--build constructs the model on every rank and measures it",
    )
    p.add_argument("config_path", nargs="?", default=None, metavar="CONFIG", help="YAML run config")
    p.add_argument("--config", "-c", dest="config_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--deepspeed", dest="deepspeed_json", help="DeepSpeed JSON merged into the config's deepspeed section"
    )
    p.add_argument(
        "--world",
        type=int,
        default=None,
        help="processes of the layout (default: the number of GPUs, or parallel.tensor on CPU)",
    )
    p.add_argument(
        "--build",
        action="store_true",
        help="also build the model in --world processes (gloo on CPU) and print what each rank holds",
    )
    p.add_argument("overrides", nargs="*", help="config overrides such as parallel.tensor=4 model.preset=1.3b")


def _cmd_plan(args) -> int:
    from megatrain.config import load_config
    from megatrain.engine.plan_command import build_report, plan_report

    config, overrides = _config_slot(args.config_path, args.config_flag, args.overrides, "plan")
    cfg = load_config(config, overrides, args.deepspeed_json)
    if _under_launcher():
        report = build_report(cfg)
        if report is not None:
            print(report, flush=True)
        return 0
    world = args.world
    if world is None:
        import torch

        world = torch.cuda.device_count() or cfg.parallel.tensor
    if world < 1:
        raise MegatrainError(f"--world must be >= 1, got {world}")
    if not args.build:
        print(plan_report(cfg, world), flush=True)
        return 0
    plan_report(cfg, world)  # a bad layout is one line here, before any process starts
    if world == 1:
        print(build_report(cfg), flush=True)
        return 0
    return _spawn_torchrun(world, args.argv)


def _add_ttt(sub):
    p = sub.add_parser(
        "ttt",
        help="test-time context training (qTTT): accuracy with and without query-only updates "
        "on the context, and the FLOP-matched thinking baseline",
    )
    p.add_argument("--config", "-c", help="YAML run config (launch/configs/ttt-tiny-cpu.yaml)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes to start on this machine: parallel.context (the default), each context prefill split over them",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as ttt.steps=16 ttt.init=runs/x")


def _cmd_ttt(args) -> int:
    from megatrain.config import load_config
    from megatrain.ttt.job import preflight, run_ttt

    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc_per_node if args.nproc_per_node is not None else cfg.parallel.context
    if _under_launcher() or nproc == 1:
        run_ttt(cfg)
        return 0
    if nproc < 1:
        raise MegatrainError(f"--nproc-per-node must be >= 1, got {nproc}")
    preflight(cfg, nproc)  # a bad config is one line, not N
    return _spawn_torchrun(nproc, args.argv, run_dir=cfg.run.dir)


def _add_generate(sub):
    p = sub.add_parser("generate", help="print continuations of text prompts from a run, checkpoint or export")
    p.add_argument("path", help="run directory, checkpoint directory or exported folder")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def _process_count(args) -> int:
    """--nproc-per-node, or the number of GPUs (1 on CPU)."""
    nproc = args.nproc_per_node
    if nproc is None:
        import torch

        nproc = torch.cuda.device_count() or 1
    if nproc < 1:
        raise MegatrainError(f"--nproc-per-node must be >= 1, got {nproc}")
    return nproc


def _under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _cmd_pretrain(args) -> int:
    from megatrain.config import load_config

    cfg = load_config(args.config, args.overrides, args.deepspeed_json)
    if args.resume and args.resume_from:
        raise MegatrainError("give --resume or --resume-from PATH, not both")
    args.resume = args.resume_from or args.resume
    if _under_launcher():
        from megatrain.engine.trainer import pretrain

        pretrain(cfg, resume=args.resume, instruments=_training_instruments(cfg))
        return 0
    nproc = _process_count(args)
    if nproc == 1:
        from megatrain.engine.trainer import pretrain

        pretrain(cfg, resume=args.resume, instruments=_training_instruments(cfg))
        return 0
    # Check everything that needs no process group here, so a bad config is one line, not N.
    from megatrain.engine.trainer import preflight

    preflight(cfg, args.resume, nproc)
    return _spawn_torchrun(nproc, args.argv, run_dir=cfg.run.dir)


def _training_instruments(cfg):
    """log.analyze_every's instruments (megatrain.analysis sits above the engine, so the CLI hands them in)."""
    from megatrain.analysis.live import training_instruments

    return training_instruments(cfg)


def _config_slot(slot: Optional[str], flag: Optional[str], overrides: list[str], command: str):
    """(config path, overrides) of a command whose YAML is an optional positional CONFIG (plan, bench,
    sweep): a first word that is an override (`a.b=c`, not an existing file) is the first override, so
    `megatrain plan --config F a=b c=d` keeps a=b; a YAML given twice is refused."""
    overrides = list(overrides)
    if slot is not None and "=" in slot and not os.path.isfile(slot):
        slot, overrides = None, [slot, *overrides]
    if slot is not None and flag is not None:
        raise MegatrainError(f"{command}: give the YAML config once (as CONFIG or --config), not '{slot}' and '{flag}'")
    return flag if flag is not None else slot, overrides


def _spawn_torchrun(nproc: int, argv: list[str], run_dir: Optional[str] = None) -> int:
    """Start `nproc` workers through torchrun's elastic agent on this machine, each running `megatrain ARGV`
    with ARGV the command line exactly as the user typed it (`args.argv`): a worker sees RANK and
    WORLD_SIZE and takes its command's worker path, where the launcher's own flags (--nproc-per-node,
    --world) are ignored. Never rebuilt from the parsed arguments, which can drop or reorder words.

    Signals (resilience.LauncherStop): the first SIGTERM or SIGUSR1 goes on to the workers, which
    checkpoint and exit 0; the launcher then says where the run in `run_dir` stopped and exits 0. A
    second SIGTERM (or SIGINT after it) kills the workers and exits 128 + the signal."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from megatrain.engine.deepspeed import _free_port
    from megatrain.engine.resilience import LauncherStop

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    targs = get_args_parser().parse_args(
        [
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "--signals-to-handle",
            LauncherStop.AGENT_SIGNALS,
            "--module",
            "megatrain.cli",
            *argv,
        ]
    )
    stop = LauncherStop().install()
    cut = False  # workers ended by the stop signal itself (it came before their loop handles it)
    try:
        run(targs)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        if not (stop.signum and all(code < 0 for code in codes)):
            return EXIT_USAGE if EXIT_USAGE in codes else (codes[0] or 1)
        cut = True
    except SignalException as exc:
        received = stop.hard or exc.sigval
        if stop.signum:
            what = "a second SIGTERM" if received == signal.SIGTERM else _signal_name(received)
            print(
                f"megatrain: {what} while the workers were stopping on {stop.name}: killed them"
                + (f"; {_last_checkpoint(run_dir)}" if run_dir is not None else ""),
                file=sys.stderr,
                flush=True,
            )
        else:
            line = "interrupted" if received == signal.SIGINT else f"stopped by {_signal_name(received)}"
            print(f"megatrain: {line}", file=sys.stderr, flush=True)
        return 128 + int(received)
    finally:
        stop.restore()
    if stop.signum and run_dir is not None:
        print(_stopped_line(run_dir, stop.name), file=sys.stderr, flush=True)
    elif stop.signum and cut:  # no run to continue (plan --build): it did not finish
        print(f"megatrain: stopped on {stop.name}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    return 0


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _stopped_line(run_dir: str, name: str) -> str:
    """Where the workers of a run stopped on signal `name`: the checkpoint written last under run_dir."""
    from megatrain.engine.checkpoint import newest_checkpoint

    found = newest_checkpoint(run_dir)
    if found is None:
        return (
            f"megatrain: stopped on {name} before the first checkpoint of {run_dir}; run the same command "
            f"again to start over"
        )
    step, path = found
    return f"megatrain: stopped at step {step} on {name}; checkpoint {path}; continue with --resume"


def _last_checkpoint(run_dir: str) -> str:
    """What a killed run left: its last complete checkpoint (crash-safe saves keep it loadable), or none."""
    from megatrain.engine.checkpoint import newest_checkpoint

    found = newest_checkpoint(run_dir)
    if found is None:
        return f"{run_dir} has no complete checkpoint"
    return f"the last complete checkpoint is {found[1]} (step {found[0]}); continue with --resume"


def _cmd_tokenizer(args) -> int:
    from megatrain.data.sources import check_files, resolve_sources
    from megatrain.data.tokenizer import Tokenizer, train_tokenizer

    files: list[str] = []
    for item in args.input:
        found = resolve_sources(item, key="--input")
        if not isinstance(found, list):
            raise MegatrainError("--input: hub datasets are not supported for tokenizer training; give local files")
        files.extend(found)
    check_files(files, key="--input")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    path = train_tokenizer(files, args.output, args.vocab_size, model_type=args.type, text_field=args.text_field)
    tok = Tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size}, {args.type}, trained on {len(files)} file(s))")
    return 0


def _cmd_config(args) -> int:
    import yaml

    from megatrain.config import config_reference, load_config

    if args.reference:
        print(config_reference())
        return 0
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_export(args) -> int:
    from megatrain.engine.export import export_hf_llama

    out = export_hf_llama(args.path, args.output)
    print(f"wrote Hugging Face Llama checkpoint to {out}")
    return 0


def _cmd_reshard(args) -> int:
    from megatrain.engine.checkpoint import resolve_checkpoint_dir
    from megatrain.errors import CheckpointError
    from megatrain.engine.reshard import convert_to_universal

    path = resolve_checkpoint_dir(os.path.normpath(args.path))
    if not os.path.isdir(path):
        raise CheckpointError(f"'{args.path}' is not a run or checkpoint directory")
    out = convert_to_universal(path)
    print(
        f"wrote {out}; resume from {path} at any parallel.tensor / parallel.pipeline / parallel.context / "
        f"process count (same ZeRO stage)"
    )
    return 0


def _cmd_generate(args) -> int:
    from megatrain.engine.load import load_for_inference
    from megatrain.generate import generate

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, _ = load_for_inference(args.path, device=device)
    prompts = [tokenizer.encode(text) for text in args.prompt]
    outputs = generate(
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        eos_id=tokenizer.eos_id,
        seed=args.seed,
        tokenizer=tokenizer,
    )
    for i, (text, new) in enumerate(zip(args.prompt, outputs)):
        if i:
            print()
        print(text + tokenizer.decode(new), flush=True)
    return 0


# --- sweep: scaling-law sweeps (megatrain/scaling/, docs/scaling.md) ---


def _add_sweep(sub):
    p = sub.add_parser(
        "sweep",
        help="scaling-law sweep: run a sweep file's runs (grid or IsoFLOP), collect, fit "
        "and plot; or emit them as a Slurm array / torchrun commands",
    )
    p.add_argument("sweep", nargs="?", help="sweep YAML (launch/configs/sweep-*.yaml)")
    p.add_argument(
        "--emit",
        choices=["slurm", "torchrun"],
        default=None,
        help="write the runs as a Slurm job array or torchrun commands into the sweep dir; run nothing",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, N, D, compute); write nothing")
    p.add_argument("--dir", default=None, help="sweep directory (default: the sweep file's dir key)")
    p.add_argument("--only", default=None, metavar="NAME", help="run this run only (a Slurm array task)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        help="processes per run (default: the sweep file's nproc_per_node, else 1)",
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        default=None,
        help="collect, fit and plot the sweep directory DIR (its sweep.yaml); run nothing",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report after running")
    p.add_argument("--quick", action="store_true", help="the file's quick variant (its 'quick' section: minutes)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each with cores/jobs threads (default 1)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, such as train.micro_batch=4")


def _cmd_sweep(args) -> int:
    from megatrain.scaling.runner import SPEC_FILE, emit_slurm, emit_torchrun, run_local
    from megatrain.scaling.spec import load_sweep, plan_runs

    args.sweep, args.overrides = _config_slot(args.sweep, None, args.overrides, "sweep")
    if (args.sweep is None) == (args.report is None):
        raise MegatrainError("give a sweep file, or --report DIR (not both)")
    path = args.sweep if args.report is None else os.path.join(args.report, SPEC_FILE)
    spec = load_sweep(path, args.overrides, quick=args.quick and args.report is None)
    if args.report is not None:
        spec.dir = args.report
    elif args.dir is not None:
        spec.dir = args.dir
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            raise MegatrainError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
        spec.nproc_per_node = args.nproc_per_node
    from megatrain.scaling.spec import check_overrides_kept
    from megatrain.scaling.study import is_study, plan_study

    if is_study(spec):
        check_overrides_kept(plan_study(spec), args.overrides)
        return _run_study(spec, args)
    runs = plan_runs(spec)
    check_overrides_kept(runs, args.overrides)
    if args.dry_run:
        print(f"{len(runs)} runs in {spec.dir} (mode {spec.mode}):")
        print(f"{'run':<40} {'method':<24} {'N':>10} {'steps':>7} {'D':>11} {'C=6ND':>9}")
        for r in runs:
            print(
                f"{r.name:<40} {r.method:<24} {r.params_non_embedding:>10,} {r.steps:>7} {r.tokens:>11,} "
                f"{r.flops_6nd:>9.3g}"
            )
        return 0
    if args.report is None and args.emit is not None:
        emit = emit_slurm if args.emit == "slurm" else emit_torchrun
        print(f"wrote {emit(spec, runs, spec.nproc_per_node)} ({len(runs)} runs)")
        return 0
    if args.report is None:
        states = run_local(spec, runs, nproc=spec.nproc_per_node, only=args.only, jobs=args.jobs)
        failed = [name for name, state in states.items() if state == "failed"]
        if failed:
            print(f"{len(failed)} run(s) failed (errors in their sweep_status.json): {', '.join(failed)}")
        if args.no_report or args.only is not None:
            return 0
    from megatrain.scaling.report import write_report

    print(f"wrote {write_report(spec, runs)}")
    return 0


def _run_study(spec, args) -> int:
    """A sweep file with tune/seeds/study sections (megatrain.scaling.study): two stages, then study.md."""
    from megatrain.scaling.study import plan_study, run_study, split_stages, write_study_report

    if args.emit is not None or args.only is not None:
        raise MegatrainError(
            "a study (a sweep file with tune/seeds) runs locally: its second stage depends on the "
            "first one's results; --emit and --only are for plain sweeps"
        )
    runs = plan_study(spec)
    if args.dry_run:
        stage1, stage2 = split_stages(spec, runs)
        print(f"study {spec.dir}: {len(stage1)} tuning runs, then up to {len(stage2)} seed runs at the chosen values")
        for r in stage1:
            print(f"  {r.name:<56} N={r.params_non_embedding:>9,} steps={r.steps:>6} D={r.tokens:>11,}")
        return 0
    if args.report is None:
        run_study(spec, jobs=args.jobs)
    print(f"wrote {write_study_report(spec, runs)}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Overrides (a.b=c) may stand anywhere, also after flags: argparse alone stops at the first flag.
    args, extra = parser.parse_known_args(argv)
    args.argv = argv  # what the user typed: a command that starts workers gives them exactly this
    unknown = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    handlers = {
        "pretrain": _cmd_pretrain,
        "rl": _cmd_rl,
        "ttt": _cmd_ttt,
        "tokenizer": _cmd_tokenizer,
        "config": _cmd_config,
        "export": _cmd_export,
        "reshard": _cmd_reshard,
        "generate": _cmd_generate,
        "analyze": _cmd_analyze,
        "import": _cmd_import,
        "bench": _cmd_bench,
        "sweep": _cmd_sweep,
        "plan": _cmd_plan,
    }
    try:
        from megatrain.env import check_environment

        check_environment()  # before any command: a bad variable is one line, never a rank's traceback
        return handlers[args.command](args)
    except MegatrainError as exc:
        rank = os.environ.get("RANK")
        if rank not in (None, "0") and getattr(exc, "same_on_every_rank", False):
            return EXIT_USAGE  # rank 0 reports it
        prefix = "megatrain: error: " if rank in (None, "0") else f"megatrain: error (rank {rank}): "
        print(prefix + str(exc), file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("megatrain: interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Destroy this process's group before the interpreter exits: a gloo group left to the exit handlers
    can abort a rank at exit ("terminate called without an active exception") after a clean run. The
    jobs keep using the group between their stages, so it is closed here, once, at the process's end."""
    if "torch" not in sys.modules:  # a command that never loaded torch has no group
        return
    from megatrain.distributed import close_process_group

    close_process_group()


def entry(argv: Optional[list[str]] = None) -> None:
    """The `megatrain` command (and `python -m megatrain.cli`): `main`, then a fast exit.

    After a command has returned, the interpreter's own teardown (freeing the module state of torch,
    DeepSpeed and torch._dynamo, which DeepSpeed's engine imports) takes 0.5-1.5 s per process and does
    nothing the finished command needs; a 2-process job pays it in the launcher and in every worker.
    So the exit does what that teardown would do for us, in the same order: wait for non-daemon
    threads, run the atexit handlers (logging, multiprocessing children), flush stdout and stderr, and
    leave with `os._exit`. Every file the jobs write is closed (or unbuffered) before `main` returns;
    an exception that escapes `main` takes Python's normal path (its traceback, the normal exit)."""
    code = main(argv)
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive():
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code or 0)  # as sys.exit: None is success


if __name__ == "__main__":
    entry()
