#!/usr/bin/env bash
# Build, test and install the C and Fortran clients, then build the Fortran example
# against the installed package (find_package(mecs_client)), as a user would.
#   clients/build.sh [BUILD_DIR] [PREFIX]      (defaults: build, build/prefix)
# Prints the paths of what it built on its last line: PREFIX EXAMPLE_BUILD_DIR.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$(realpath -m "${1:-$root/build}")"
prefix="$(realpath -m "${2:-$build/prefix}")"
for tool in cmake cc gfortran curl-config; do
  command -v "$tool" >/dev/null || { echo "clients/build.sh: '$tool' is missing (apt-get install cmake gcc gfortran libcurl4-openssl-dev)" >&2; exit 3; }
done
quiet() { "$@" >"$build/last.log" 2>&1 || { cat "$build/last.log" >&2; exit 1; }; }
mkdir -p "$build"
quiet cmake -S "$root/clients" -B "$build/clients" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix"
quiet cmake --build "$build/clients" --parallel 2
quiet ctest --test-dir "$build/clients" --output-on-failure
quiet cmake --install "$build/clients"
quiet cmake -S "$root/examples/fortran-l96" -B "$build/fortran-l96" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix"
quiet cmake --build "$build/fortran-l96" --parallel 2
echo "$prefix $build/fortran-l96"
