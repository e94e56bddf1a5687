#!/bin/bash
# make check: the benchmark harness's smoke run (bench/run --smoke): tiny sizes, every
# piece started and driven once, no figure compared with a target. Exit 77 = skipped.
exec bash "${top_srcdir:-$(dirname "$0")/..}/bench/run" --smoke
