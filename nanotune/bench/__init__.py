"""nanotune's benchmarks, each a command that prints its ratios and saves its table.

python -m nanotune.bench            vs_transformers.py: training step, forward and generation against transformers
python -m nanotune.bench.sampling   sampling.py: decoding speed against the rate the weights can be read
python -m nanotune.bench.breakdown  breakdown.py: where one token's time goes (torch.profiler), generate and engine
python -m nanotune.bench.serve      serve.py: the server's tokens/s with 1, 2, 4 and 8 clients
"""
