"""`interceptor bench`: interception modes compared in one run, interleaved, on real
proxies (HAProxy sidecars) and real load generators (wrk, iperf3). Prints numbers and
ratios; never passes or fails on them."""
