"""Ratios to the baselines, the issue's targets, and the Markdown table.

Every ratio reads "times as good as the baseline": throughput over the baseline's for
a-e and g, the baseline's p99 over ours for f and h. The raw-write ratio of a row that fsyncs is
taken against the raw write that fsyncs too. A form upload (g) is also compared with the
same target's single PATCH of the same bytes (a) in the same run: `vs_single_patch`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.scenarios import SCENARIOS, Result, Sizes
from benchmarks.servers import TARGETS

BASELINES = {
    "tus-node": "x @tus/server",
    "tuspy": "x tuspyserver",
    "bare-aiohttp": "x bare aiohttp",
    "raw": "x raw write",
}
RSS_LIMIT_MIB = 100.0
SLOW_RSS_SUM_LIMIT_MIB = 400.0  # h: the whole process tree
SLOW_HEAD_P99_LIMIT_MS = 100.0
F_P99_LIMIT_MS = 150.0
RSS_SLOPE_LIMIT_MIB_PER_GIB = 0.5  # "no upward slope": under 5 MiB over 10 GiB


def human_size(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % (factor // 4) == 0:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


def scenario_title(key: str, sizes: Sizes) -> str:
    return SCENARIOS[key].title.format(
        single=human_size(sizes.single_bytes),
        patch=human_size(sizes.patch_bytes),
        n=sizes.concurrent_uploads if key == "c" else sizes.small_count,
        each=human_size(sizes.concurrent_bytes),
        small=human_size(sizes.small_bytes),
        soak=human_size(sizes.soak_bytes),
        slow=sizes.slow_uploads,
        rate=human_size(sizes.slow_rate),
        seconds=sizes.slow_seconds,
    )


def add_ratios(results: list[Result]) -> None:
    for scenario in SCENARIOS.values():
        rows = {r.target: r for r in results if r.scenario == scenario.name}
        for row in rows.values():
            if TARGETS[row.target].kind == "raw":
                continue
            value = row.metric(scenario.metric)
            for baseline in BASELINES:
                if baseline == "raw" and TARGETS[row.target].is_durable:
                    base = rows.get("raw-fsync")
                else:
                    base = rows.get(baseline)
                if base is None or base is row:
                    continue
                base_value = base.metric(scenario.metric)
                if not value or not base_value:
                    continue
                ratio = base_value / value if scenario.metric == "p99_ms" else value / base_value
                row.ratios[f"vs_{baseline}"] = round(ratio, 2)
    for row in results:
        single = _row(results, "a", row.target)
        is_server = TARGETS[row.target].kind != "raw"  # raw g and a are the same write
        if row.scenario == SCENARIOS["g"].name and single is not None and is_server:
            form_mb_per_s, single_mb_per_s = row.metric("mb_per_s"), single.metric("mb_per_s")
            if form_mb_per_s and single_mb_per_s:
                row.ratios["vs_single_patch"] = round(form_mb_per_s / single_mb_per_s, 2)


@dataclass
class Check:
    """One target of the issue: what is needed, what this run measured."""

    name: str
    needed: str
    measured: str
    met: bool | None  # None: not measured in this run

    def as_json(self) -> dict[str, Any]:
        return {"kind": "target", **asdict(self)}


_RATIO_TARGETS = (
    ("a", "tus-node", 2.0), ("b", "tus-node", 1.5), ("c", "tus-node", 2.0),
    ("d", "tus-node", 1.5), ("a", "bare-aiohttp", 0.8), ("b", "bare-aiohttp", 0.8),
    ("c", "bare-aiohttp", 0.8), ("d", "bare-aiohttp", 0.8),
)  # fmt: skip


def checks(results: list[Result], sha256_mb_per_s: float | None = None) -> list[Check]:
    """The targets of issue 9, judged on the `tusserver --fsync never` rows (like with like),
    then those of issue 24 that this run measured (`_issue_24_checks`)."""
    found: list[Check] = []
    for key, baseline, needed in _RATIO_TARGETS:
        row = _row(results, key, "tusserver")
        ratio = row.ratios.get(f"vs_{baseline}") if row else None
        found.append(Check(
            f"{SCENARIOS[key].name}: tusserver vs {baseline}", f">= {needed}x",
            "-" if ratio is None else f"{ratio}x", None if ratio is None else ratio >= needed,
        ))  # fmt: skip
    for target in ("tusserver", "tusserver-durable"):
        row = _row(results, "e", target)
        if row is None:
            continue
        peak = row.peak_rss_mib
        found.append(Check(
            f"e_soak: {target} peak RSS of each process", f"< {RSS_LIMIT_MIB:g} MiB",
            "-" if peak is None else f"{peak} MiB", None if peak is None else peak < RSS_LIMIT_MIB,
        ))  # fmt: skip
        slope = row.rss_slope_mib_per_gib
        found.append(Check(
            f"e_soak: {target} RSS slope (steepest process)",
            f"<= {RSS_SLOPE_LIMIT_MIB_PER_GIB} MiB/GiB",
            "-" if slope is None else f"{slope} MiB/GiB",
            None if slope is None else slope <= RSS_SLOPE_LIMIT_MIB_PER_GIB,
        ))  # fmt: skip
    return found + _issue_24_checks(results, sha256_mb_per_s)


def _at_least(name: str, value: float | None, needed: float, unit: str = "x") -> Check:
    shown = "-" if value is None else f"{value:g}{unit}"
    return Check(name, f">= {needed:g}{unit}", shown, None if value is None else value >= needed)


def _below(name: str, value: float | None, limit: float, unit: str) -> Check:
    shown = "-" if value is None else f"{value:,.1f} {unit}"
    return Check(name, f"< {limit:g} {unit}", shown, None if value is None else value < limit)


def _issue_24_checks(results: list[Result], sha256_mb_per_s: float | None) -> list[Check]:
    """Issue 24's targets, each only where this run has the rows it needs. "Default
    settings" are the tusserver-durable rows, `--fsync never` the tusserver rows."""
    found: list[Check] = []
    durable_f = _row(results, "f", "tusserver-durable")
    if durable_f is not None:
        found.append(Check(
            "issue 24, f: tusserver (default) HEAD+PATCH p99 under c", f"<= {F_P99_LIMIT_MS:g} ms",
            _ms(durable_f.p99_ms),
            None if durable_f.p99_ms is None else durable_f.p99_ms <= F_P99_LIMIT_MS,
        ))  # fmt: skip
        if _row(results, "f", "tus-node") is not None:
            ratio = durable_f.ratios.get("vs_tus-node")
            found.append(_at_least("issue 24, f: tusserver (default) p99, @tus/server's over "
                                   "ours", ratio, 1.0))  # fmt: skip
    for key, target, baseline, needed in (
        ("a", "tusserver-durable", "tus-node", 1.5), ("c", "tusserver-durable", "tus-node", 1.5),
        *((k, "tusserver", "tus-node", 2.0) for k in "abcd"),
        *((k, "tusserver", "tuspy", 1.2) for k in "abcd"),
        ("a", "tusserver", "bare-aiohttp", 0.6),
    ):  # fmt: skip
        row = _row(results, key, target)
        if row is not None and _row(results, key, baseline) is not None:
            name = f"issue 24, {SCENARIOS[key].name}: {target} vs {baseline}"
            found.append(_at_least(name, row.ratios.get(f"vs_{baseline}"), needed))
    single, bare = _row(results, "a", "tusserver"), _row(results, "a", "bare-aiohttp")
    if single and bare and single.cpu_s_per_gb and bare.cpu_s_per_gb and sha256_mb_per_s:
        floor = bare.cpu_s_per_gb + 1000 / sha256_mb_per_s  # hashlib: s per 10^9 bytes
        found.append(Check(
            "issue 24, a: tusserver CPU s/GB over (bare append's + hashlib SHA-256's)",
            "<= 1.1x", f"{single.cpu_s_per_gb / floor:.2f}x ({single.cpu_s_per_gb:.2f} s/GB, "
            f"floor {floor:.2f})", single.cpu_s_per_gb / floor <= 1.1,
        ))  # fmt: skip
    for target in ("tusserver", "tusserver-durable"):
        rows = [r for r in results if r.target == target and not r.error  # h: its own target
                and r.scenario not in (SCENARIOS["f"].name, SCENARIOS["h"].name)
                and r.peak_rss_mib is not None]  # fmt: skip
        if rows:
            peak = max(rows, key=lambda r: r.peak_rss_mib or 0.0)
            found.append(_below(f"issue 24: {target} peak RSS per process, a-g "
                                f"(highest: {peak.scenario})", peak.peak_rss_mib,
                                RSS_LIMIT_MIB, "MiB"))  # fmt: skip
        slow = _row(results, "h", target)
        if slow is None:
            continue
        found += [
            _below(f"issue 24, h: {target} RSS of the process tree", slow.peak_rss_sum_mib,
                   SLOW_RSS_SUM_LIMIT_MIB, "MiB"),
            _below(f"issue 24, h: {target} new HEAD p99", slow.p99_ms, SLOW_HEAD_P99_LIMIT_MS,
                   "ms"),
            Check(f"issue 24, h: {target} uploads that failed", "0", str(slow.failed),
                  None if slow.failed is None else slow.failed == 0),
        ]  # fmt: skip
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} ms"


def _row(results: list[Result], key: str, target: str) -> Result | None:
    for result in results:
        if result.scenario == SCENARIOS[key].name and result.target == target and not result.error:
            return result
    return None


def _form_against_single(results: list[Result]) -> list[str]:
    """g beside a, target by target: the same bytes as one form part and as one PATCH."""
    rows = [
        r for r in results
        if r.scenario == SCENARIOS["g"].name and not r.error and TARGETS[r.target].kind != "raw"
    ]  # fmt: skip
    pairs = [(row, _row(results, "a", row.target)) for row in rows]
    if not any(single is not None for _, single in pairs):
        return []
    lines = [
        "",
        "| the same bytes as one form part (g) and one PATCH (a) | a MB/s | g MB/s | g / a "
        "| peak RSS MiB, largest process: a / g |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for form, single in pairs:
        if single is None:
            continue
        ratio = form.ratios.get("vs_single_patch")
        lines.append(
            f"| {form.label} | {_cell(single.mb_per_s)} | {_cell(form.mb_per_s)} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} "
            f"| {_cell(single.peak_rss_mib, 0)} / {_cell(form.peak_rss_mib, 0)} |"
        )
    return lines


def _slow_clients(results: list[Result], sizes: Sizes) -> list[str]:
    """h target by target: what failed, the probe's HEAD and pair, the tree's memory."""
    rows = [r for r in results if r.scenario == SCENARIOS["h"].name and not r.error]
    if not rows:
        return []
    lines = [
        "",
        f"| many slow clients (h): {sizes.slow_uploads} uploads at "
        f"{human_size(sizes.slow_rate)}/s for {sizes.slow_seconds} s | failed | what they got "
        "| all created within s | new HEAD p50 / p99 ms | p99 once all were created "
        "| HEAD+PATCH p50 / p99 ms | peak RSS MiB (largest / sum) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        got = ", ".join(f"{kind}: {n}" for kind, n in (row.failures or {}).items()) or "-"
        lines.append(
            f"| {row.label} | {row.failed} | {got} | {_cell(row.created_within_s, 1)} "
            f"| {_cell(row.p50_ms, 1)} / {_cell(row.p99_ms, 1)} | {_cell(row.created_p99_ms, 1)} "
            f"| {_cell(row.pair_p50_ms, 1)} / {_cell(row.pair_p99_ms, 1)} "
            f"| {_cell(row.peak_rss_mib, 0)} / {_cell(row.peak_rss_sum_mib, 0)} |"
        )
    return lines


def _cell(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _percent_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _range_cell(row: Result) -> str:
    """`runs: lowest-highest` of the metric the row's median was chosen by."""
    values = row.run_values or []
    if len(values) < 2:
        return str(row.runs)
    digits = 0 if min(values) >= 100 else 1 if min(values) >= 10 else 2
    return f"{row.runs}: {min(values):,.{digits}f}-{max(values):,.{digits}f}"


def _ratio_cell(row: Result, baseline: str) -> str:
    ratio = row.ratios.get(f"vs_{baseline}")
    return "-" if ratio is None else f"{ratio:.2f}x"


def markdown(results: list[Result], sizes: Sizes, machine: dict[str, Any]) -> str:
    """The results table, the SHA-256 figure, the write-size sweep and the targets."""
    sha256_mb_per_s = machine.get("sha256_mb_per_s")
    lines = [
        "| scenario | target | MB/s | uploads/s | p50 ms | p99 ms | runs: range | server CPU s "
        "| server CPU s/GB | CPU pressure | peak RSS MiB (largest / sum) | x @tus/server "
        "| x tuspyserver | x bare aiohttp | x raw write |",
        "| --- | --- " + "| ---: " * 13 + "|",
    ]
    for key, scenario in SCENARIOS.items():
        title = f"{key}: {scenario_title(key, sizes)}"
        for row in (r for r in results if r.scenario == scenario.name):
            label = row.label + (f" ({row.workers} workers)" if (row.workers or 1) > 1 else "")
            if row.error:
                lines.append(f"| {title} | {label} | error: {row.error.splitlines()[0][:80]} "
                             "| | | | | | | | | | | | |")  # fmt: skip
                continue
            rss = "-" if row.peak_rss_mib is None or key == "f" else (
                f"{row.peak_rss_mib:.0f} / {row.peak_rss_sum_mib or 0:.0f}"
            )  # fmt: skip
            if row.rss_slope_mib_per_gib is not None:
                rss += f" (slope {row.rss_slope_mib_per_gib:+.2f}/GiB)"
            is_f = key == "f"  # the load of c: its throughput, CPU and RSS are in c's row
            cpu = "" if is_f else _cell(row.cpu_s, 2)
            cpu_per_gb = "" if is_f else _cell(row.cpu_s_per_gb, 2)
            lines.append(
                f"| {title} | {label} | {'' if is_f else _cell(row.mb_per_s)} "
                f"| {'' if is_f else _cell(row.uploads_per_s)} "
                f"| {_cell(row.p50_ms, 2)} | {_cell(row.p99_ms, 2)} | {_range_cell(row)} | {cpu} "
                f"| {cpu_per_gb} | {_percent_cell(row.cpu_pressure_pct)} "
                f"| {rss} | {_ratio_cell(row, 'tus-node')} | {_ratio_cell(row, 'tuspy')} "
                f"| {_ratio_cell(row, 'bare-aiohttp')} | {_ratio_cell(row, 'raw')} |"
            )
    if sha256_mb_per_s is not None:
        single = _row(results, "a", "tusserver")
        beside = f"; tusserver's single stream: {single.mb_per_s:,.1f} MB/s" if single else ""
        lines += ["", f"hashlib SHA-256 on this machine, one core: {sha256_mb_per_s:,.1f} MB/s"
                  f"{beside} (tusserver hashes every byte it receives)."]  # fmt: skip
    lines += _form_against_single(results)
    lines += _slow_clients(results, sizes)
    sweep = machine.get("write_size_sweep")
    if sweep:
        shown = ", ".join(f"{size}: {m['mb_per_s']:,.0f} MB/s ({m['cpu_s']:.2f} s CPU)"
                          for size, m in sweep.items())  # fmt: skip
        total = human_size(int(machine.get("write_size_sweep_bytes", 0)))
        lines += ["", f"Page-cache write of {total} by the size of each write(): {shown}."]
    found = checks(results, sha256_mb_per_s)
    if found:
        lines += [
            "",
            "| target of the issue | needed | measured | met |",
            "| --- | --- | --- | --- |",
        ]
        for check in found:
            met = {True: "yes", False: "**no**", None: "not measured"}[check.met]
            lines.append(f"| {check.name} | {check.needed} | {check.measured} | {met} |")
    return "\n".join(lines) + "\n"
