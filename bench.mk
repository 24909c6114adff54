# make bench            issue 6's benchmark (~20 minutes): sync, resync, unsync on an ext4 loop
#                       image with a tmpfs VOLATILE, in a private mount namespace; out/bench.json
# make bench QUICK=1    the same on smaller data sets (a few minutes)
# Not a test: it measures and prints; see bench/README.md.

BENCH_APT := rsync e2fsprogs util-linux coreutils

.PHONY: bench

bench: venv
	@missing=""; for p in $(BENCH_APT); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PY) bench/run.py $(if $(QUICK),--quick) $(BENCH_ARGS)
