"""End-to-end generation benchmark (GPU): random-weight Llama models in bf16, one process, every cache side by side.

The command line over eval/lib's helpers: `lib.models` and `lib.caches` (the models and the caches compared),
`lib.generate_row` (the timed rows: prefill, decode wall and GPU time, memory), `lib.generate_budget` (the largest
batch and the longest context that fit in a memory budget) and `lib.generate_report` (the issue's targets, the tables
and the plot). The rows run first, then the
budget searches (their model rebuilt: seconds), so a run cut short by ``--deadline-s`` loses the search first.
``--caches`` takes the keys of `lib.caches.CACHES`, and any mode name for hf_kvquant's caches (``int8``,
``int8_per_token_head``, ...; ``unquantized`` is ``dynamic``). By default the eager caches run; the compiled ones
(``static_compiled``, transformers' bf16 `StaticCache` + compile, the anchor, and ``static_compiled_no_cudnn``
without cuDNN SDPA; ``int8_compiled``, ``fp8_compiled``: ours preallocated + compile) are named with ``--caches`` or
chosen by ``--compiled``, which runs ``static_compiled``, ``int8_compiled``, ``fp8_compiled`` and eager ``int8`` on
the issue's rows (the shapes' rows; ``--rows`` picks some) and no budget search. They compile as
`generate` does (`lib.generate_row` says how they are measured): ``--compile-backend`` (inductor) and
``--compile-mode`` (reduce-overhead, i.e. CUDA graphs; ``none``: torch.compile's default), and ``--match-steps``
greedy steps of each are checked against the same cache decoded eagerly. Before the first row, one untimed compiled
step per compiled cache on the tiny model pays the process's one-time compile costs.

Writes ``NAME.json`` and ``NAME.md`` (``--name``, default ``bench_generate``) into ``--out-dir`` (default: a new
folder under the temporary directory; ``--out-dir eval/results`` rewrites the published ones) after every cache of
every row (a run cut short keeps what it measured) and ``NAME.png`` at the end (matplotlib, if installed;
``--replot`` redraws the table and plot from the JSON, on any machine; ``--replot --merge A,B`` writes NAME from the
rows of the runs A and B, e.g. one run split over two invocations).

    python eval/bench_generate.py [--quick] [--shapes 1b,8b] [--rows 1b:8x8192,...] [--caches dynamic,int8,...]
        [--steps 16] [--repeats 3] [--search-shapes 1b] [--budget-gib 40] [--deadline-s 540] [--out-dir DIR]
    python eval/bench_generate.py --compiled --shapes 1b --name bench_generate_compiled_1b    # compiled vs StaticCache
    python eval/bench_generate.py --device cpu --tiny      # CPU smoke run of the plumbing (2-layer model)
    python eval/bench_generate.py --replot --out-dir DIR [--name NAME] [--merge NAME1,NAME2]
"""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm.auto import tqdm

from hf_kvquant.evaluation import ACCEPTED_MODES

from lib.caches import CACHES, COMPILED, EAGER_CACHES, cache_keys
from lib.decoding import free_memory
from lib.environment import environment, versions_line
from lib.generate_budget import SEARCH_CACHES, past_deadline, search_budget
from lib.generate_report import fmt, markdown, save
from lib.generate_row import bench_row, prewarm_compile
from lib.models import SHAPES, build_model
from lib.quanto import prepare_quanto
from lib.results import resolve_out_dir, results_parser

QUICK = dict(rows="1b:1x2048,1b:8x8192", steps=8, repeats=2, search_granularity=8, search_caches="dynamic,int8")
TINY = dict(shapes="tiny", rows="tiny:1x128,tiny:2x256", search_shapes="tiny", search_context=256, warmup_prompt=16,
            steps=4, repeats=2, warmup_steps=2, profile_steps=2, prefill_repeats=2, search_steps=2, threads=1,
            compile_backend="eager", compile_mode="none", match_steps=8)
# The compiled caches against StaticCache + compile, with eager INT8 for the speed-up, on the rows.
COMPILED_RUN = dict(caches="static_compiled,int8_compiled,fp8_compiled,int8", search_shapes="none")


def _items(text: str) -> list[str]:
    """The items of a comma-separated list ('none': no item)."""
    return [item.strip() for item in text.split(",") if item.strip() not in ("", "none")]


def _parse_rows(text: str) -> list[tuple[str, int, int]]:
    rows = []
    for item in _items(text):
        shape, _, size = item.partition(":")
        batch, _, prompt = size.partition("x")
        if shape not in SHAPES or not batch.isdigit() or not prompt.isdigit():
            raise SystemExit(f"error: bad row {item!r}; expected SHAPE:BATCHxPROMPT with SHAPE in {sorted(SHAPES)}")
        rows.append((shape, int(batch), int(prompt)))
    return rows


def _shapes(text: str) -> list[str]:
    names = _items(text)
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"error: unknown {unknown}; accepted: {', '.join(SHAPES)}")
    return names


def _caches(text: str, offered: dict = CACHES) -> list[str]:
    try:
        return cache_keys(text, offered)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def parse_args(argv=None):
    parser = results_parser(__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the 2-layer model and short rows (CPU smoke run)")
    parser.add_argument("--quick", action="store_true", help="two 1B rows, fewer steps, a coarse search")
    parser.add_argument("--compiled", action="store_true",
                        help=f"caches {COMPILED_RUN['caches']} (compiled vs StaticCache + compile), no budget search")
    parser.add_argument("--shapes", default="1b,8b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=None, help="SHAPE:BATCHxPROMPT,... (default: the shapes' rows; 'none')")
    parser.add_argument("--caches", default=",".join(EAGER_CACHES),
                        help=f"of {', '.join(CACHES)}; ours by any mode name too ({', '.join(ACCEPTED_MODES)}); "
                             "default: the eager ones")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled caches")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode of the compiled caches ('none': its default; CUDA graphs need a GPU)")
    parser.add_argument("--match-steps", type=int, default=64,
                        help="greedy steps of each compiled cache checked against the same cache decoded eagerly")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup-prompt", type=int, default=256)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=16,
                        help="decode steps before timing; >= 16 so that Triton has compiled every specialization")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=4)
    parser.add_argument("--search-shapes", default="1b", help="shapes whose memory budget is searched ('none': skip)")
    parser.add_argument("--search-caches", default=",".join(SEARCH_CACHES))
    parser.add_argument("--budget-gib", type=float, default=None, help="default: 40 (1B shape), 60 (8B shape)")
    parser.add_argument("--search-context", type=int, default=32768)
    parser.add_argument("--search-steps", type=int, default=4)
    parser.add_argument("--search-granularity", type=int, default=32)
    parser.add_argument("--quanto-build-timeout", type=float, default=0.0,
                        help="seconds allowed to JIT-build quanto's extension (0: use its plain-PyTorch unpack)")
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="start no new cache or search attempt after this many seconds (0: none)")
    parser.add_argument("--name", default="bench_generate", help="the outputs' name: NAME.json, NAME.md, NAME.png")
    parser.add_argument("--replot", action="store_true",
                        help="rewrite the markdown and plot from the JSON in --out-dir")
    parser.add_argument("--merge", default=None,
                        help="with --replot: NAME1,NAME2,... in --out-dir, whose rows and searches make --name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch during the run (0: unchanged; --tiny: 1, fastest for its tensors)")
    argv = sys.argv[1:] if argv is None else list(argv)
    for flag, defaults in (("--quick", QUICK), ("--tiny", TINY), ("--compiled", COMPILED_RUN)):
        if flag in argv:
            parser.set_defaults(**defaults)  # explicit options still win
    args = parser.parse_args(argv)
    if args.replot and args.out_dir is None:
        parser.error("--replot redraws NAME.json of --out-dir: name that folder")
    args.out_dir = resolve_out_dir(args.out_dir, args.name)
    args.device = torch.device(args.device)
    args.dtype_ = getattr(torch, args.dtype)
    args.compile_mode = None if args.compile_mode.lower() == "none" else args.compile_mode
    shapes = _shapes(args.shapes)
    args.rows_ = _parse_rows(args.rows) if args.rows is not None else [(s, b, p) for s in shapes for b, p in
                                                                       SHAPES[s].rows]
    args.caches_ = _caches(args.caches)
    args.search_shapes_ = _shapes(args.search_shapes)
    args.search_caches_ = _caches(args.search_caches, EAGER_CACHES)  # the search decodes eagerly
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        names = _items(args.merge) if args.merge else [args.name]
        parts = [json.loads((args.out_dir / f"{name}.json").read_text()) for name in names]
        result = parts[0]
        if len(parts) > 1:  # one run split over invocations: the first one's header, everyone's rows and searches
            result = {**result, "merged": names, "rows": [r for p in parts for r in p["rows"]],
                      "search": [s for p in parts for s in p["search"]], "skipped": {
                          k: v for p in parts for k, v in p["skipped"].items()},
                      "complete": all(p["complete"] for p in parts), "elapsed_s": sum(p["elapsed_s"] for p in parts)}
        save(result, args.out_dir, with_plot=True, name=args.name)
        return result
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)


def run(args, argv) -> dict:
    args.start_ = time.perf_counter()
    device = args.device
    result = {
        **environment(device, "optimum-quanto"),
        "settings": {"dtype": args.dtype, "warmup_prompt": args.warmup_prompt, "prefill_repeats": args.prefill_repeats,
                     "warmup_steps": args.warmup_steps, "steps": args.steps, "repeats": args.repeats,
                     "profile_steps": args.profile_steps, "search_steps": args.search_steps,
                     "search_granularity": args.search_granularity, "compile_backend": args.compile_backend,
                     "compile_mode": args.compile_mode, "match_steps": args.match_steps,
                     "argv": sys.argv[1:] if argv is None else argv},
        "rows": [], "search": [], "skipped": {}, "complete": False, "elapsed_s": 0.0,
    }
    caches = list(args.caches_)
    if "hf_quanto_int4" in caches + args.search_caches_:
        try:
            result["quanto"] = prepare_quanto(device, args.quanto_build_timeout)
        except Exception as error:  # noqa: BLE001 -- ImportError when it is not installed; any failure skips it only
            result["skipped"]["hf_quanto_int4"] = f"optimum-quanto unusable: {type(error).__name__}: {error}"
            caches = [k for k in caches if k != "hf_quanto_int4"]
            args.search_caches_ = [k for k in args.search_caches_ if k != "hf_quanto_int4"]
    print(f"{result['device']}; {versions_line(result['versions'])}; writing to {args.out_dir}")

    def checkpoint(with_plot: bool = False) -> None:
        result["elapsed_s"] = time.perf_counter() - args.start_
        save(result, args.out_dir, with_plot, name=args.name)

    progress = tqdm(total=len(args.rows_) * len(caches), desc="rows x caches", disable=args.no_progress)
    search_progress = tqdm(desc="budget attempts", disable=args.no_progress or not args.search_caches_)
    with torch.inference_mode():
        compiled = [key for key in caches if key in COMPILED]
        if compiled and args.rows_:
            try:
                result["compile_prewarm_s"] = prewarm_compile(compiled, args)
            except Exception as error:  # noqa: BLE001 -- the compiled rows will say what fails; the others run
                result["compile_prewarm_error"] = f"{type(error).__name__}: {error}"
                tqdm.write(f"compile prewarm failed: {result['compile_prewarm_error']}")
                free_memory(device, collect=True)
        # The rows first, then the budget searches (their model rebuilt: seconds): a run cut short loses the search.
        for shape_name in dict.fromkeys(s for s, _, _ in args.rows_):
            if past_deadline(args):
                result["deadline_reached"] = True
                break
            model = build_model(SHAPES[shape_name], device, args.dtype_)
            for shape, batch, prompt in args.rows_:
                if shape != shape_name:
                    continue
                row = {"shape": shape, "model": SHAPES[shape].model, "batch": batch, "prompt": prompt, "caches": {}}
                result["rows"].append(row)
                for key in caches:
                    progress.set_postfix_str(f"{shape} {batch}x{prompt} {key}")
                    if past_deadline(args):
                        row["caches"][key] = {"skipped": "deadline reached"}
                        result["deadline_reached"] = True
                        continue
                    try:
                        row["caches"][key] = entry = bench_row(model, key, batch, prompt, args)
                        compile_note = "" if "compile_s" not in entry else (
                            f"  compile {entry['compile_s']:.1f} s, tokens = eager: "
                            f"{entry.get('tokens_match_eager', '–')} ({entry.get('tokens_agreement', 0):.0%})")
                        tqdm.write(f"{shape} {batch}x{prompt} {CACHES[key][0]:<27} "
                                   f"prefill {entry['prefill_ms']:9.1f} ms  decode {entry['decode_tok_s']:8.1f} tok/s  "
                                   f"{entry['ms_per_step_wall']:7.2f} ms/step (GPU {fmt(entry['gpu_ms_per_step'])})  "
                                   f"KV {entry['kv_bytes'] / 2**20:.1f} MiB{compile_note}")
                    except Exception as error:  # noqa: BLE001 -- record it, free the memory, go on with the rest
                        row["caches"][key] = {"error": f"{type(error).__name__}: {error}"}
                        tqdm.write(f"{shape} {batch}x{prompt} {CACHES[key][0]}: {row['caches'][key]['error']}")
                    free_memory(device, collect="error" in row["caches"][key])
                    progress.update()
                    checkpoint()
            del model
            free_memory(device, collect=True)
        for shape_name in args.search_shapes_ if args.search_caches_ else ():
            if past_deadline(args):
                result["deadline_reached"] = True
                break
            model = build_model(SHAPES[shape_name], device, args.dtype_)
            result["search"].append(search_budget(model, shape_name, args, search_progress))
            checkpoint()
            del model
            free_memory(device, collect=True)
    progress.close()
    search_progress.close()
    result["complete"] = not result.get("deadline_reached") and not any(
        s.get("deadline_reached") for s in result["search"])
    checkpoint(with_plot=True)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
