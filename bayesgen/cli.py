"""The ``bayesgen`` command line: ``bayesgen bench ...``, ``bayesgen bench-*`` and
``bayesgen demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text):
    """Comma-separated integers and inclusive ranges ``a-b`` or ``a-b:step``.

    ``"0-18:2"`` is the even splits 0, 2, ..., 18; ``"3,5-7"`` is 3, 5, 6, 7.
    """
    out = []
    for item in _csv(text):
        try:
            if "-" not in item:
                out.append(int(item))
                continue
            span, _, step = item.partition(":")
            first, last = (int(v) for v in span.split("-"))
            step = int(step) if step else 1
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not an integer or a range a-b[:step] (e.g. 0-18:2)") from None
        if step < 1 or last < first:
            raise argparse.ArgumentTypeError(
                f"range {item!r} must go up (a <= b) with a positive step")
        out.extend(range(first, last + 1, step))
    return out


def _write_results(out, rows, command, title, table=None, name="results"):
    """Write ``OUT/<name>.md`` (title, command, ``table``: markdown, by default the bench
    runner's table of ``rows``) and ``OUT/<name>.json`` (``rows``); return ``table``."""
    if table is None:
        from bayesgen.bench.runner import format_table

        table = format_table(rows)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(f"# {title}\n\nCommand: `{command}`\n\n{table}\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(rows, f, indent=1, default=float)
    return table


def bench_main(argv):
    from bayesgen.bench.runner import METHODS, run_bench, steptime_comparison

    p = argparse.ArgumentParser(prog="bayesgen bench", description="Run the benchmark table.")
    p.add_argument("--targets", type=_csv, default=["funnel", "eight_schools_centered"])
    p.add_argument("--methods", type=_csv,
                   default=["realnvp", "nsf", "numpyro-normal", "numpyro-iaf", "nuts"],
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--particles", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steptime", action="store_true",
                   help="also time AutoMAF/AutoRealNVP against AutoIAFNormal at equal size")
    p.add_argument("--options", type=json.loads, default={},
                   help='guide keyword arguments per method, as JSON: '
                        '\'{"ksivi": {"init_scale": [[0, 0], [5, 5]]}}\'')
    p.add_argument("--out", default="outputs/bench")
    a = p.parse_args(argv)
    unknown = set(a.options) - set(a.methods)
    if unknown:
        p.error(f"--options names methods not in --methods: {', '.join(sorted(unknown))}")
    t0 = time.time()
    rows, _ = run_bench(a.targets, a.methods, steps=a.steps, num_particles=a.particles,
                        learning_rate=a.lr, num_samples=a.samples, seed=a.seed,
                        guide_options=a.options)
    if a.steptime:
        rows += steptime_comparison(a.targets, seed=a.seed)
    command = "bayesgen bench " + " ".join(argv)
    table = _write_results(a.out, rows, command, "bayesgen bench")
    print(table)
    print(f"\n[bench] {time.time() - t0:.0f} s; results in {a.out}/results.md")


def demo_main(argv):
    from bayesgen.bench.demo import run_demo

    p = argparse.ArgumentParser(prog="bayesgen demo",
                                description="Flows vs numpyro guides vs NUTS on two hard posteriors.")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    run_demo(a.out, steps=a.steps, seed=a.seed)


def memory_main(argv):
    from bayesgen.bench.memory import run_memory_benchmark

    p = argparse.ArgumentParser(prog="bayesgen bench-memory",
                                description="Peak memory of 4000 draws from a flow on a 601-d BNN.")
    p.add_argument("--flow", default="maf")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--draws", type=int, default=4000)
    a = p.parse_args(argv)
    run_memory_benchmark(a.flow, steps=a.steps, num_draws=a.draws)


def livi_main(argv):
    from bayesgen.bench.livi import livi_bnn_benchmark

    p = argparse.ArgumentParser(
        prog="bayesgen bench-livi",
        description="AutoLIVI against numpyro AutoNormal on a wide BNN: step time, memory, metrics.",
    )
    p.add_argument("--hidden", type=lambda t: tuple(int(h) for h in _csv(t)), default=(1000, 1000),
                   help="hidden widths, e.g. 1000,1000 (~1M weights) or 4128,4128 (~17M)")
    p.add_argument("--dataset", default="kin8nm", help="a UCI set name or 'synthetic'")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    livi_bnn_benchmark(hidden=a.hidden, dataset=a.dataset, steps=a.steps, batch_size=a.batch,
                       num_particles=a.particles, seed=a.seed)


def sgmcmc_main(argv):
    from bayesgen.bench.sgmcmc import (
        METHODS,
        format_paired_table,
        format_sgmcmc_table,
        format_tuning_table,
        sgmcmc_bnn_study,
    )

    p = argparse.ArgumentParser(
        prog="bayesgen bench-sgmcmc",
        description="SGLD, SGHMC, cyclical SGLD and Entropy-SGLD against NUTS on a BNN "
                    "classifier (breast cancer): test accuracy, NLL, ECE over random splits.",
    )
    p.add_argument("--methods", type=_csv, default=list(METHODS),
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--hidden", type=lambda t: tuple(int(h) for h in _csv(t)), default=(16,))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2000, help="SG burn-in steps per chain")
    p.add_argument("--samples", type=int, default=400, help="kept draws per chain")
    p.add_argument("--cycles", type=int, default=4)
    p.add_argument("--lr-grid", type=lambda t: [float(v) for v in _csv(t)], default=None,
                   help="step sizes to tune over, in learning-rate units (step x N)")
    p.add_argument("--eta-grid", type=lambda t: [float(v) for v in _csv(t)], default=None)
    p.add_argument("--settings", type=json.loads, default=None,
                   help='fixed settings that skip the tuning, as JSON: \'{"sgld": {"lr": 1}}\'')
    p.add_argument("--no-nuts", action="store_true", help="skip the NUTS reference")
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-sgmcmc")
    a = p.parse_args(argv)
    grids = {k: v for k, v in (("lr_grid", a.lr_grid), ("eta_grid", a.eta_grid)) if v is not None}
    t0 = time.time()
    result = sgmcmc_bnn_study(
        a.methods, num_splits=a.splits, hidden=a.hidden, batch_size=a.batch,
        num_chains=a.chains, num_warmup=a.warmup, num_samples=a.samples, num_cycles=a.cycles,
        settings=a.settings, nuts=not a.no_nuts, nuts_warmup=a.nuts_warmup,
        nuts_samples=a.nuts_samples, seed=a.seed, **grids,
    )
    command = " ".join(["bayesgen bench-sgmcmc", *argv])
    one, pooled = format_sgmcmc_table(result, "chain"), format_sgmcmc_table(result, "pooled")
    tuning = format_tuning_table(result) if result["tuning"] else "(no tuning: --settings given)"
    paired = "\n\n".join(
        f"Against {b} (θ), one-chain BMA:\n\n{format_paired_table(result, b)}"
        for b in ("sgld", "cyclical_sgld") if b in a.methods)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(f"# bayesgen bench-sgmcmc\n\nCommand: `{command}`\n\n"
                f"Config: `{json.dumps(result['config'])}`\n\n"
                f"## One-chain BMA (mean over chains), mean ± se over splits\n\n{one}\n\n"
                f"## Pooled BMA of all chains\n\n{pooled}\n\n"
                f"## Paired differences over splits (method minus baseline)\n\n{paired}\n\n"
                f"## Tuning (validation part of split 0's training set)\n\n{tuning}\n\n"
                f"Total time: {result['total_s']:.0f} s\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    print(one)
    print()
    print(pooled)
    print()
    print(paired)
    print(f"\n[bench-sgmcmc] {time.time() - t0:.0f} s; results in {a.out}/results.md")


def nuts_main(argv):
    from bayesgen.bench.nuts import DEFAULT_TARGETS, format_nuts_table, nuts_comparison

    p = argparse.ArgumentParser(
        prog="bayesgen bench-nuts",
        description="ESS per second and per gradient of bayesgen's NUTS (blackjax) against "
        "numpyro's NUTS on the same models, alternating in one process.",
    )
    p.add_argument("--targets", type=_csv, default=list(DEFAULT_TARGETS))
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-nuts")
    a = p.parse_args(argv)
    start = time.time()
    rows = nuts_comparison(a.targets, num_chains=a.chains, num_warmup=a.warmup,
                           num_samples=a.samples, repeats=a.repeats, seed=a.seed)
    table = _write_results(a.out, rows, "bayesgen bench-nuts " + " ".join(argv),
                           "bayesgen bench-nuts", format_nuts_table(rows))
    print(table)
    print(f"\n[bench-nuts] {time.time() - start:.0f} s; results in {a.out}/results.md")


def dgp_main(argv):
    from bayesgen.bench.dgp import (
        METHODS, dgp_step_times, dgp_uci_study, format_dgp_table, format_paired_table,
        format_split_table, format_step_times, paired_differences, read_rows, summarise,
        write_rows,
    )

    p = argparse.ArgumentParser(
        prog="bayesgen bench-dgp",
        description="Deep GPs on UCI regression with the standard splits: DSVI vs DDVI vs "
        "DBVI, test RMSE and log-likelihood (original units), mean ± se over splits.",
    )
    p.add_argument("--datasets", type=_csv, default=["bostonHousing"])
    p.add_argument("--layers", type=_int_list, default=[2], help="e.g. 2,3,5 or 2-5")
    p.add_argument("--methods", type=_csv, default=list(METHODS))
    p.add_argument("--splits", type=int, default=None, help="first N splits (default all)")
    p.add_argument("--split-ids", type=_int_list, default=None,
                   help="split indices to run instead of the first N: comma-separated, with "
                   "inclusive ranges a-b[:step] (e.g. 0-18:2 for the even splits)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--lr", type=float, default=None, help="default: per method")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--inducing", type=int, default=100)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", type=json.loads, default={},
                   help='JSON guide options per method, e.g. \'{"dbvi": {"log_snr_min": -10}}\' '
                   "(kept in each row; the tables list such a variant as its own method); "
                   'also "warm_start": "dsvi" (start the DeepGP parameters where the split\'s '
                   'DSVI fit ends) and "freeze_model_params": true (fit only the guide)')
    p.add_argument("--clip-norm", type=float, default=None,
                   help="clip the gradient's global norm before Adam (default: no clipping)")
    p.add_argument("--batch-splits", action="store_true",
                   help="fit the splits of each (dataset, layers, method) together, one "
                   "vmapped fit (for a GPU; the rows are the one-at-a-time fits' rows up to "
                   "round-off)")
    p.add_argument("--out", default="outputs/bench-dgp",
                   help="folder for results.md, results.json and rows.jsonl (one row a fit, "
                   "written as each fit ends)")
    p.add_argument("--resume", action="store_true",
                   help="skip the fits already in OUT/rows.jsonl with the same settings, and "
                   "go on from the checkpoint of a fit that was stopped")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="checkpoint each fit every N steps into OUT/checkpoints (a multiple "
                   "of 100; 0: none; not with --batch-splits); deleted when its row is logged")
    p.add_argument("--from-rows", nargs="+", default=None, metavar="ROWS_JSONL",
                   help="fit nothing: summarise these row logs (e.g. of runs that shared out "
                   "the splits) into one table")
    p.add_argument("--write-rows", default=None, metavar="PATH",
                   help="with --from-rows: also write the merged rows (one per fit, a re-run "
                   "replacing the earlier row) to PATH, sorted by split, method and variant")
    p.add_argument("--step-time", type=int, default=None, metavar="STEPS",
                   help="fit nothing: time a compiled SVI step of DSVI and of each diffusion "
                   "guide with the network's parameter gradient per step and batched, on the "
                   "first split given (default 0), best of 5 interleaved rounds of STEPS steps")
    a = p.parse_args(argv)
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    if a.step_time is not None:
        split = a.split_ids[0] if a.split_ids else 0
        rows = [r for ds in a.datasets for layers in a.layers
                for r in dgp_step_times(ds, layers, split=split, steps=a.step_time,
                                        batch_size=a.batch, num_inducing=a.inducing,
                                        seed=a.seed)]
        print(_write_results(a.out, rows, "bayesgen bench-dgp " + " ".join(argv),
                             "bayesgen bench-dgp --step-time", format_step_times(rows),
                             name="step_times"))
        return
    if a.write_rows and not a.from_rows:
        p.error("--write-rows merges the logs given with --from-rows; pass them")
    if a.from_rows:
        rows = read_rows(a.from_rows)
        if a.write_rows:
            rows = write_rows(rows, a.write_rows)
    else:
        rows = dgp_uci_study(a.datasets, a.layers, a.methods, num_splits=a.splits,
                             split_ids=a.split_ids, steps=a.steps,
                             learning_rate=a.lr, batch_size=a.batch, num_inducing=a.inducing,
                             num_samples=a.samples, seed=a.seed, method_options=a.options,
                             clip_norm=a.clip_norm, batch_splits=a.batch_splits,
                             rows_path=os.path.join(a.out, "rows.jsonl"), resume=a.resume,
                             checkpoint_every=a.checkpoint_every)
    table = format_dgp_table(summarise(rows))
    paired = paired_differences(rows)
    if paired:
        table += ("\n\nPaired by split (the published claims: DDVI beats DSVI, DBVI beats "
                  "DDVI):\n\n" + format_paired_table(paired))
    _write_results(a.out, rows, "bayesgen bench-dgp " + " ".join(argv), "bayesgen bench-dgp",
                   f"{table}\n\n## Each split\n\n{format_split_table(rows)}")
    print(table)
    print(f"\n[bench-dgp] {time.time() - t0:.0f} s; results in {a.out}/results.md")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bayesgen {bench,bench-memory,bench-livi,bench-sgmcmc,bench-nuts,bench-dgp,"
              "demo} "
              "[options]   "
              "(bayesgen CMD --help for options)")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        bench_main(rest)
    elif cmd == "demo":
        demo_main(rest)
    elif cmd == "bench-memory":
        memory_main(rest)
    elif cmd == "bench-livi":
        livi_main(rest)
    elif cmd == "bench-sgmcmc":
        sgmcmc_main(rest)
    elif cmd == "bench-nuts":
        nuts_main(rest)
    elif cmd == "bench-dgp":
        dgp_main(rest)
    else:
        print(f"bayesgen: unknown command {cmd!r}; use 'bench', 'bench-memory', 'bench-livi', "
              "'bench-sgmcmc', 'bench-nuts', 'bench-dgp' or 'demo'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
