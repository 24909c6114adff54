# make bench            issue 6's benchmark (~20 minutes): sync, resync, unsync on an ext4 loop
#                       image with a tmpfs VOLATILE, in a private mount namespace; out/bench.json
# make bench QUICK=1    the same on smaller data sets (a few minutes)
# Not a test: it measures and prints; see bench/README.md.

.PHONY: bench

# deps (top-level Makefile) installs rsync, e2fsprogs and util-linux, which the benchmark needs.
bench: deps venv
	$(PY) bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)
