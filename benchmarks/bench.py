"""Speed and memory benchmark; same as ``torchsingd bench`` (see its ``--help``).

python benchmarks/bench.py --models mlp cnn vit --T 1 10 --dtypes float32 bfloat16
"""

from torchsingd.experiments.bench import main

if __name__ == "__main__":
    main()
