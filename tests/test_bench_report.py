"""Benchmark reporting: pure logic on synthetic samples (the benchmark itself runs as
`interceptor bench`, never as a pass/fail test)."""
from interceptor.harness.bench import report


def sample(rps, rnd, p99=1.0):
    return {"rps": rps, "round": rnd, "p50_ms": 0.5, "p90_ms": 0.8, "p99_ms": p99,
            "sidecars_ms": 10.0, "total_ms": 20.0, "requests": int(rps), "socket_errors": 0,
            "bad_responses": 0}


RESULTS = {
    "env": {"kernel": "k", "cpus": 2, "cpu": "cpu"},
    "settings": {"runs": 2, "seconds": 1},
    "samples": {"rr c=16": {
        "explicit": [sample(100, 0), sample(80, 1)],
        "iptables": [sample(100, 0), sample(50, 1)],
        "ebpf": [sample(200, 0), sample(150, 1)],
    }},
    "rules": {"iptables": {"10": [sample(10, 0)], "1000": [sample(5, 0)]},
              "ebpf": {"10": [sample(10, 0)], "1000": [sample(10, 0)]}},
    "cni": None,
}


def test_ratios_are_per_round():
    # round 0: 200/100 = 2.0, round 1: 150/50 = 3.0 -> median 2.5, not 175/75
    assert report._ratios(RESULTS["samples"]["rr c=16"], "ebpf", "iptables", "rps") == [2.0, 3.0]
    text = report.render(RESULTS)
    line = next(line for line in text.splitlines() if line.startswith("ebpf "))
    assert "2.50 (2.00-3.00)" in line


def test_rules_table_and_plots(tmp_path):
    text = report.render(RESULTS)
    row = next(line for line in text.splitlines() if line.strip().startswith("1000"))
    assert row.split()[-1] == "2.00"          # ebpf / iptables at 1000 entries
    report.plots(RESULTS, tmp_path)
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert (tmp_path / "rules.png").stat().st_size > 0


def test_rules_ratios_to_the_smallest_list_pair_samples_of_one_round():
    results = dict(RESULTS, rules={"ebpf": {"10": [sample(100, 0), sample(50, 1)],
                                            "1000": [sample(40, 1), sample(90, 0)]}})
    text = report.render(results).splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("each mode at N vs at N=10"))
    row = next(line for line in text[start:] if line.strip().startswith("1000"))
    assert "0.85 (0.80-0.90)" in row           # 90/100 in round 0, 40/50 in round 1


def test_conns_table_and_plot(tmp_path):
    from interceptor.harness.bench import conns

    def row(mode, n, rps, rnd):
        return dict(sample(rps, rnd), mode=mode, connections=n, held=n, failed=0, seconds=1.0,
                    slab_per_conn=4096.0, tcp_mem_per_conn=0.0)
    results = {"counts": [1000, 100000], "modes": ["iptables", "ebpf-nobypass"], "rows": [
        row("iptables", 1000, 100, 0), row("iptables", 100000, 50, 0),
        row("ebpf-nobypass", 1000, 120, 0), row("ebpf-nobypass", 100000, 114, 0)]}
    text = conns.render(results)
    last = next(line for line in text.splitlines() if line.strip().startswith("100000"))
    assert "0.50" in last and "0.95" in last and last.endswith("2.28")   # 114/50 per round
    assert "ebpf-nobypass: 4.0 + 0.0 KiB, 0 failed" in text
    conns.plot(results, tmp_path)
    assert (tmp_path / "conns.png").stat().st_size > 0


def test_connect_cost_table_gives_per_round_differences_to_the_smallest_lists():
    from interceptor.harness.bench import connect_cost
    results = {"connects_per_block": 100, "samples": {
        "0": [9000.0, 9100.0], "10": [10000.0, 11000.0], "10000": [10500.0, 11300.0]}}
    lines = connect_cost.render(results).splitlines()
    assert lines[2].split()[:2] == ["not", "enrolled"]
    last = lines[-1].split()
    assert last[0] == "10000" and last[1] == "10.90" and last[-2] == "+0.40"   # (500 + 300) / 2 ns


def test_filter_cost_subtracts_the_bare_pass_of_the_same_hook_and_round():
    from interceptor.harness.bench import filter_cost
    results = {"repeat": 10, "packet_bytes": 1514, "samples": {
        "tc pass only": [10, 12], "tc filter, default": [50, 54],
        "xdp pass only": [5, 5], "xdp filter, default": [25, 35]}}
    lines = filter_cost.render(results).splitlines()
    tc = next(line for line in lines if line.startswith("tc filter"))
    xdp = next(line for line in lines if line.startswith("xdp filter"))
    assert "41 (40-42)" in tc and "25 (20-30)" in xdp
    assert "3.42%" in tc        # 41 ns x 833,333 packets/s of 1500 B at 10 Gbit/s
