# Development tasks. `just --list` shows them all.

# Every test, on SQLite and on PostgreSQL (a throwaway server unless WMS_TEST_PG_URL is set)
test *args:
    scripts/test {{args}}

# Formatting and lints, as CI checks them
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --all-features -- -D warnings

# What CI runs: lint, then every test with a PostgreSQL server of its own
ci:
    bash .ci/run

# The README's tour on a scratch database
demo:
    scripts/demo

# The performance suite, in release mode, on SQLite and a throwaway PostgreSQL; `just bench --quick` for a smoke test
bench *args:
    cargo bench -p wmsctl --bench suite -- {{args}}
