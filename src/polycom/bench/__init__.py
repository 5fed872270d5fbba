"""Benchmarks with their own command; results are files, not assertions on time.

    polycom bench activations      # op timings and saved bytes -> bench/activations.{csv,md}
    polycom bench training         # training-step cost per activation (bench_training)

``python -m polycom.bench <subcommand>`` is the same.
"""
