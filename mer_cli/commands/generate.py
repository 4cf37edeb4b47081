"""``mer generate --model STORE --prompt TEXT``: streamed text generation."""

from __future__ import annotations

import json
import sys

import click


@click.command("generate")
@click.option(
    "--model",
    "model",
    metavar="STORE",
    help="Store made by mer quantize, or 'builtin' [default: the built-in model, "
    "a small MoE trained on Python's standard library, converted into the cache "
    "directory on first use].",
)
@click.option(
    "--prompt",
    metavar="TEXT",
    help="Prompt text; '-' reads it from stdin (minus one final newline).",
)
@click.option(
    "--prompts-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help='Many prompts: one per line, or JSON Lines with a "prompt" field.',
)
@click.option(
    "--max-tokens", default=256, show_default=True, help="Most tokens to generate."
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    help="0 = greedy; higher samples more freely.",
)
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option(
    "--top-k", default=0, show_default=True, help="Sample among k best; 0 = off."
)
@click.option("--seed", type=int, help="Random seed; same seed, same text.")
@click.option(
    "--stop",
    multiple=True,
    metavar="TEXT",
    help="Stop when this text appears (not printed). Repeatable.",
)
@click.option(
    "--chat", is_flag=True, help="Wrap the prompt in the store's chat template."
)
@click.option(
    "--speculative",
    type=click.Choice(["lookup", "draft"]),
    help="Speculative greedy decoding, same output, fewer forward passes: lookup "
    "drafts by copying from the prompt and text so far (n-gram match); draft "
    "drafts with the smaller model of --draft.",
)
@click.option(
    "--draft",
    metavar="STORE",
    help="Draft model for --speculative draft (implies it): a smaller store with "
    "the same tokenizer, held in RAM.",
)
@click.option(
    "--draft-tokens",
    type=int,
    metavar="K",
    help="Most drafted tokens checked per forward pass (1-31); fewer, or none, "
    "when the acceptance so far does not pay for the drafts' expert fetches. "
    "[default: 16 with a draft model, 5 with lookup]",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
@click.option(
    "--stats",
    is_flag=True,
    help="Print tok/s, time to first token, expert I/O and peak RSS on stderr.",
)
@click.option("--threads", type=int, help="Compute threads [default: all cores].")
@click.option(
    "--ctx",
    type=int,
    help="Context length (KV cache positions) [default: min(max_position, 4096)].",
)
@click.option(
    "--kv-cache",
    "kv_dtype",
    type=click.Choice(["f32", "f16"]),
    default="f32",
    show_default=True,
    help="KV cache element type; f16 halves its memory.",
)
@click.option(
    "--ram-budget",
    metavar="SIZE",
    help="DRAM for cached experts, e.g. 6GiB [default: config ram_budget, else "
    "half the available memory]. Dense weights and the KV cache come on top.",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Force streaming experts from the drive, or force all in RAM "
    "[default: stream only when the experts exceed --ram-budget].",
)
@click.option(
    "--io-threads",
    type=click.IntRange(min=1),
    help="Reader threads (I/O queue depth) [default: config io_threads, else the "
    "drive's profile from mer profile-ssd, else 8].",
)
@click.option(
    "--prefetch/--no-prefetch",
    default=True,
    show_default=True,
    help="Read the next layers' likely experts ahead (router lookahead, or "
    "--predictor), only while live precision says it pays.",
)
@click.option(
    "--predictor",
    type=click.Path(dir_okay=False),
    metavar="PRED",
    help="Rank prefetches with this predictor (from mer train-predictor on traces "
    "of this store) instead of router lookahead.",
)
@click.option(
    "--verify-checksums",
    is_flag=True,
    help="Check the CRC-32 of every expert extent as it is read.",
)
@click.option(
    "--no-io-measure",
    is_flag=True,
    help="With no drive profile, skip the 0.5 s read measurement that --stats/--json "
    "compare the read speed with.",
)
@click.option(
    "--trace-out",
    type=click.Path(dir_okay=False),
    metavar="TRACE",
    help="Also write the routing trace of every token (see mer-trace(5)).",
)
@click.option(
    "--batch",
    type=int,
    metavar="N",
    help="Decode up to N prompts together (1-32), sharing each expert read; "
    "results in input order, each the same as its own run.",
)
@click.option(
    "--kv-budget",
    metavar="SIZE",
    help="With --batch: memory for the KV caches of the prompts in flight, e.g. "
    "64MiB [default: what N of the longest prompts need].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Configuration file [default: $MER_CONFIG or ~/.config/mer/config.toml].",
)
def command(
    model: str | None,
    prompt: str | None,
    prompts_file: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    chat: bool,
    speculative: str | None,
    draft: str | None,
    draft_tokens: int | None,
    as_json: bool,
    stats: bool,
    threads: int | None,
    ctx: int | None,
    kv_dtype: str,
    ram_budget: str | None,
    stream: bool | None,
    io_threads: int | None,
    prefetch: bool,
    predictor: str | None,
    verify_checksums: bool,
    no_io_measure: bool,
    trace_out: str | None,
    batch: int | None,
    kv_budget: str | None,
    config_path: str | None,
) -> None:
    """Generate text from a prompt, streamed to stdout as tokens come.

    With --json, each prompt gives one line: {"prompt", "completion",
    "prompt_tokens", "completion_tokens", "finish_reason", "stats"}; finish_reason
    is eos, stop, length (--max-tokens), context (--ctx full) or interrupted.
    Ctrl-C stops and keeps what was generated.

    When the experts exceed --ram-budget they stream from the drive with
    O_DIRECT reads into that many bytes of fixed slots; the output is the same
    as with every expert in RAM. --stats then also prints bytes read, read GB/s
    and its share of the drive's best (from its mer profile-ssd profile, else a
    quick measurement), the hit rate beside LRU's and Belady's optimum, the time
    stalled on reads, prefetch precision/recall and the peak RSS.

    Prefetch reads the experts the next layers are likely to ask for while the
    current one computes: by default router lookahead (the next layer's router
    on this layer's hidden state); with --predictor PRED the predictor's scores
    for the next 1-3 layers, which also feed the cache's eviction. A throttle
    calibrates the scores by how often hinted experts were really used and
    issues a read only when probability x the stall a used prefetch was
    measured to save (at most a demand miss's) exceeds the drive time a wasted
    read takes from demand reads (its read time x how busy the drive is), with
    no more in flight than the drive reads during one layer's compute; when
    precision collapses prefetch turns itself off and only probes now and then.
    Over it all, a trial times decode itself: pairs of 4-token windows, one
    with prefetch allowed and one without, in random order, and prefetch
    stays on only while it is measured faster (a checking pair every few
    windows keeps measuring). Demand reads always go first. --stats shows what
    the throttle and the trial did.

    --speculative (greedy only) drafts up to --draft-tokens tokens and checks
    them with the last token in one forward pass, which reads each routed
    expert once for all of them; drafts are kept while they equal the model's
    own greedy choice, so the text is exactly that of plain decoding. How many
    drafts a pass checks follows the acceptance and pass cost measured so far
    (a pass fetches the union of its tokens' experts); with --prompts-file
    each prompt starts from what the earlier ones measured. --stats and --json
    add the acceptance rate and tokens per forward pass.

    --batch N decodes up to N prompts of --prompts-file together: each step runs
    one token of every prompt in flight, fetches the union of the experts they
    chose once per layer and runs each expert once over all the tokens routed
    to it, so a read from the drive serves several tokens. A finished prompt
    leaves and the next one joins (its prompt runs alone first). Each result is
    exactly what the prompt gives alone; they come out in input order. Each
    prompt's KV cache holds only the positions it can use, and --kv-budget caps
    their sum (a prompt waits for room). --stats ends with the aggregate tok/s,
    expert fetches and bytes read per token (beside what one-token steps would
    fetch) and the KV memory beside the expert cache. --batch does not combine
    with --speculative or --trace-out.

    \b
    Examples:
      mer generate --prompt "def fibonacci(n):"        # the built-in model
      mer generate --model mixtral.mer --prompt "The capital of France is"
      echo "Write a haiku" | mer generate --model qwen.mer --prompt - --chat
      mer generate --model m.mer --prompts-file prompts.jsonl --json > out.jsonl
      mer generate --model m.mer --prompts-file p.txt --batch 16 --json --stats
      mer generate --model m.mer --prompt "Once" --temperature 0.8 --seed 1 --stats
      mer generate --model mixtral.mer --prompt "Hi" --ram-budget 4GiB --stats
      mer generate --model m.mer --prompt "Hi" --predictor m.pred.npz --stats
      mer generate --model m.mer --prompts-file edits.txt --speculative lookup
      mer generate --model big.mer --draft small.mer --prompt "Hi" --stats
    """
    from mer_cli import builtin
    from mer_cli.config import load_config
    from mer_cli.formats.store import Store
    from mer_cli.generate import GenerateOptions, generate_many, load, read_prompts
    from mer_cli.prefetch import use_predictor
    from mer_cli.sources import SourceOptions, open_source, plan_source, read_ceiling

    if (prompt is None) == (prompts_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT and --prompts-file")
    if prompt == "-":
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # echo's newline
    if draft and speculative is None:
        speculative = "draft"
    if speculative == "draft" and not draft:
        raise click.UsageError("--speculative draft needs --draft STORE")
    if draft and speculative != "draft":
        raise click.UsageError(
            f"--draft {draft} is only used by --speculative draft; drop one of them"
        )
    if speculative and trace_out:
        raise click.UsageError(
            "--trace-out records every forward pass, and --speculative passes hold "
            "drafted tokens that may be rejected; leave out --speculative to write "
            "a trace"
        )
    kv_bytes = _check_batch(batch, kv_budget, trace_out, speculative)
    prompts = [prompt] if prompt is not None else read_prompts(prompts_file)
    options = GenerateOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        chat=chat,
        speculative=speculative,
        draft_tokens=draft_tokens,
    )
    options.check()
    cfg = load_config(config_path)
    source_options = SourceOptions(
        ram_budget=ram_budget,
        stream=stream,
        io_threads=io_threads,
        prefetch=prefetch,
        verify_checksums=verify_checksums,
    )
    model = builtin.resolve(model)
    store = Store.open(model)
    pred = None
    if predictor:  # checked against the store before anything loads
        if not prefetch:
            raise click.UsageError(
                f"--predictor {predictor} ranks prefetches, which --no-prefetch "
                "turns off; drop one of them"
            )
        from mer_cli.predictors import load_predictor

        pred = load_predictor(predictor, store)
    threads = cfg.threads if threads is None else threads
    drafter = None
    if draft:  # checked (same tokenizer) before the big model loads
        from mer_cli.speculative import DraftModel

        drafter = DraftModel.open(
            draft, store, ctx=ctx, kv_dtype=kv_dtype, threads=threads
        )
    plan = plan_source(store, source_options, cfg)
    ceiling = None
    if stats or as_json:  # before the slots exist: its buffers never add to them
        ceiling = read_ceiling(store, plan, measure=not no_io_measure)
    engine, tok = load(
        model,
        ctx=ctx,
        kv_dtype=kv_dtype,
        threads=threads,
        source=lambda st: open_source(st, plan),
    )
    use_predictor(engine, pred)
    use_predictor(engine, pred)
    if batch is not None:
        try:
            _run_batch(engine, tok, prompts, options, batch, kv_bytes, as_json, stats)
        finally:
            engine.close()
        return
    recorder = None
    if trace_out:
        from mer_cli.trace import TraceRecorder

        recorder = TraceRecorder(engine)
    out = sys.stdout
    try:
        for c in generate_many(engine, tok, prompts, options, ceiling, drafter):
            try:
                for piece in c:
                    if not as_json:
                        out.write(piece)
                        out.flush()
            finally:
                if c.started:  # also on Ctrl-C: what was generated so far goes out
                    _finish(c.result, as_json, stats)
        if recorder is not None:
            recorder.finish().save(trace_out)
    finally:
        engine.close()
        if drafter is not None:
            drafter.close()


def _check_batch(
    batch: int | None,
    kv_budget: str | None,
    trace_out: str | None,
    speculative: str | None,
) -> int | None:
    """Usage checks of --batch/--kv-budget; the KV budget in bytes (or None)."""
    if batch is None:
        if kv_budget is not None:
            raise click.UsageError("--kv-budget only applies with --batch N")
        return None
    from mer_cli.batch import max_batch
    from mer_cli.units import parse_size

    if not 1 <= batch <= max_batch():
        raise click.UsageError(
            f"--batch {batch}: expected a whole number in 1..{max_batch()} (rows "
            "the kernels compute bit-identically to one-token steps)"
        )
    if trace_out:
        raise click.UsageError(
            "--trace-out records one sequence at a time; leave out --batch to "
            "write a trace"
        )
    if speculative:
        raise click.UsageError(
            "--batch and --speculative both batch tokens into one forward pass; "
            "use one of them"
        )
    if kv_budget is None:
        return None
    n = parse_size(kv_budget, what="--kv-budget")
    if n <= 0:
        raise click.UsageError(f"--kv-budget {kv_budget}: expected a size above 0")
    return n


def _run_batch(engine, tok, prompts, options, batch, kv_bytes, as_json, stats):
    """Continuous batching: print each result in input order, then the totals."""
    from mer_cli.batch import BatchGeneration

    def show(result) -> None:
        if not as_json:
            sys.stdout.write(result.completion)
        _finish(result, as_json, False)
        if stats:
            s = result.stats
            click.echo(
                f"[{result.prompt_tokens} prompt tokens, {result.completion_tokens} "
                f"generated, {result.finish_reason}] prefill "
                f"{s['prefill_tok_s'] or 0:.2f} tok/s, decode "
                f"{s['decode_tok_s'] or 0:.2f} tok/s (its share of batched steps), "
                f"first token {s['time_to_first_token_s'] or 0:.2f} s",
                err=True,
            )

    run = BatchGeneration(engine, tok, prompts, options, batch, kv_bytes)
    try:
        for result in run:
            show(result)
    except KeyboardInterrupt:  # what was generated so far goes out
        for result in run.unfinished():
            show(result)
        raise
    if stats:
        _print_batch_stats(run.stats.as_dict())


def _print_batch_stats(d: dict) -> None:
    from mer_cli.units import format_size

    def num(v, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    def size(v) -> str:
        return "-" if v is None else format_size(int(v))

    shared = (
        d["expert_fetches_unshared"] / d["expert_fetches"]
        if d["expert_fetches"]
        else None
    )
    kv = d["kv_cache"]
    click.echo(
        f"batch {d['batch']}: {d['prompts']} prompts, {d['completion_tokens']} "
        f"tokens generated in {d['wall_s']:.2f} s ({num(d['tok_s'])} tok/s); decode "
        f"{d['decode_tokens']} tokens in {d['steps']} steps (mean batch "
        f"{num(d['mean_batch'])}) at {num(d['decode_tok_s'])} tok/s; prefill "
        f"{num(d['prefill_tok_s'])} tok/s",
        err=True,
    )
    click.echo(
        f"experts per decoded token: {size(d['expert_bytes_per_token'])} fetched "
        f"(one token at a time: {size(d['expert_bytes_per_token_unshared'])}, "
        f"{num(shared)}x more), {size(d['decode_bytes_read_per_token'])} read "
        f"from the drive; {size(d['bytes_read'])} read in all",
        err=True,
    )
    click.echo(
        f"memory: expert cache {size(d['expert_cache_nbytes'])} "
        f"({d['expert_source']}), KV caches {size(kv['peak_nbytes'])} at most of a "
        f"{size(kv['budget'])} budget ({kv['dtype']})",
        err=True,
    )


def _finish(result, as_json: bool, stats: bool) -> None:
    """End one prompt's output: its JSON line, or the newline after the text."""
    if as_json:
        sys.stdout.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        _print_stats(result)


def _print_stats(result) -> None:
    s = result.stats

    def num(v, unit: str) -> str:
        return "-" if v is None else f"{v:.2f} {unit}"

    click.echo(
        f"[{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated, "
        f"{result.finish_reason}] prefill {num(s.get('prefill_tok_s'), 'tok/s')}, "
        f"decode {num(s.get('decode_tok_s'), 'tok/s')}, "
        f"first token {num(s.get('time_to_first_token_s'), 's')}",
        err=True,
    )
    sp = s.get("speculative")
    if sp:
        rate = sp["acceptance_rate"]
        click.echo(
            f"speculative ({sp['method']}, up to {sp['draft_tokens']} drafts): "
            f"{sp['accepted']} of {sp['drafted']} drafted tokens accepted "
            f"({'-' if rate is None else f'{100 * rate:.1f}%'}), "
            f"{sp['tokens_per_pass'] or 0:.2f} tokens per forward pass, "
            f"drafting {sp['draft_s']:.3f} s",
            err=True,
        )
    io = s.get("io")
    if io:
        _print_io(s, io)
    elif s.get("source"):
        click.echo(f"experts: {s['source'].get('source', '?')} (all in RAM)", err=True)
    rss = s.get("peak_rss_bytes")
    if rss:
        click.echo(f"peak RSS {rss / 2**20:.1f} MiB", err=True)


def _print_io(s: dict, io: dict) -> None:
    from mer_cli.units import format_size

    src = s.get("source") or {}

    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def gb(v) -> str:
        return "-" if v is None else f"{v:.3f} GB/s"

    line = (
        f"experts streamed: {src.get('slots', '?')} slots of "
        f"{format_size(src.get('slot_nbytes', 0))}, read "
        f"{format_size(io['bytes_read'])} at {gb(io['read_gbps'])}"
    )
    if io.get("ceiling_gbps"):
        line += (
            f" = {pct(io['read_share_of_ceiling'])} of {gb(io['ceiling_gbps'])} "
            f"({io['ceiling_from']})"
        )
    click.echo(line, err=True)
    devices = src.get("read_devices") or []
    if len(devices) > 1:  # a sharded store: how the reads split over the drives
        total = sum(d["bytes_read"] for d in devices) or 1
        split = ", ".join(
            f"device {d['device']} {format_size(d['bytes_read'])} "
            f"({100 * d['bytes_read'] / total:.0f}%, busy {d['read_seconds']:.2f} s)"
            for d in devices
        )
        click.echo(f"reads per device: {split}", err=True)
    click.echo(
        f"stalled on reads {pct(io['stall_share'])} of the run, "
        f"{pct(io['decode_stall_share'])} of decode; decode reads "
        f"{gb(io['decode_read_gbps'])} ({gb(io['decode_read_gbps_wall'])} over "
        "decode time)",
        err=True,
    )
    click.echo(
        f"hit rate {pct(io.get('hit_rate'))} with prefetch; without prefetch on "
        f"the same requests LRU {pct(io.get('hit_rate_lru'))}, "
        f"Belady MIN {pct(io.get('hit_rate_belady'))}; prefetch precision "
        f"{pct(io.get('prefetch_precision'))}, recall "
        f"{pct(io.get('prefetch_recall'))}",
        err=True,
    )
    th = src.get("prefetch_throttle")
    if th and src.get("prefetch_hints") != "off":
        used = ", ".join(f"{k} {pct(v)}" for k, v in th["hints_used"].items())
        g = th["stall_per_miss_s"]
        gate = th.get("hint_gates", {}).get(src.get("prefetch_hints"))
        gated = ""
        if gate and gate["hints_skipped"]:
            n = gate["hints_computed"]
            gated = (
                f"; hints computed for {n} of {n + gate['hints_skipped']} layers "
                "(the rest skipped: computing them saved less than it cost)"
            )

        def ms(v) -> str:
            return "-" if v is None else f"{1000 * v:.1f} ms"

        click.echo(
            f"prefetch ({src.get('prefetch_hints', '?')}): throttle {th['state']}, "
            f"{th['issued']} issued ({th['probes']} probes), skipped "
            f"{th['skipped_benefit']} (benefit below cost) and "
            f"{th['skipped_bandwidth']} (no spare bandwidth); live precision "
            f"{pct(th['live_precision'])}; hinted experts used: {used or '-'} "
            f"({th['candidates_checked']} checked); a miss stalls {ms(g)}, a read "
            f"takes {ms(th['read_s_per_extent'])} with the drive busy "
            f"{pct(th['drive_busy_share'])} -> reads only above p = "
            f"{th['threshold']:.2f}{gated}",
            err=True,
        )
        from mer_cli.prefetch import TRIAL_TOKENS

        tr = th.get("trial") or {}
        if tr.get("pairs"):
            verdict = {
                "on": "prefetch stays on",
                "off": "prefetch stays off",
            }.get(tr["verdict"], "still measuring")
            click.echo(
                f"prefetch trial: {verdict}; decode with it "
                f"{ms(tr['on_ms_per_token'] / 1000)}/token against "
                f"{ms(tr['off_ms_per_token'] / 1000)} without "
                f"({tr['speedup']:.2f}x, {tr['pairs']} alternating pairs of "
                f"{TRIAL_TOKENS}-token windows)",
                err=True,
            )
