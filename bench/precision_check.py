"""The CPU's bf16 default against float32 on the bundled digits model (README, "Precision"): the held-out NLL (all
1000 terms, the same q noise) and the sample quality of 1,000 samples (the same seed, so the same x_T and z), each
with the network in float32 and under bf16 autocast, and the standard errors that say whether they differ
(binomial for the confident share; a bootstrap over the samples for the classifier-feature Frechet distance; the NLL
difference is paired, image by image).

    python bench/precision_check.py            # ~25 minutes on 2 CPU cores
    python bench/precision_check.py --n 256    # a quicker, coarser look
"""
import argparse
import json
import time

import torch

import ddpm_fast
from ddpm_fast import bundled
from ddpm_fast.data import load_images, to_model_range
from ddpm_fast.evaluation import frechet_distance, sample_quality, train_classifier

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="samples per precision (default 1000)")
    parser.add_argument("--bootstrap", type=int, default=50, help="resamples for the distance's error (default 50)")
    args = parser.parse_args()
    model = ddpm_fast.pretrained()
    held_out = bundled.digits("held_out")[0]
    train_images, labels = bundled.digits("train")
    classifier = train_classifier(train_images, labels, epochs=20, progress=False)
    with torch.no_grad():
        reference = classifier.features(to_model_range(load_images(held_out, progress=False)))[1::2]
    results = {}
    for name, dtype in DTYPES.items():
        begin = time.perf_counter()
        bound = ddpm_fast.nll(model, held_out, progress=False, network_dtype=dtype)
        nll_seconds = time.perf_counter() - begin
        begin = time.perf_counter()
        samples = ddpm_fast.sample(model, args.n, seed=0, progress=False, network_dtype=dtype)
        sample_seconds = time.perf_counter() - begin
        report = sample_quality(samples, held_out, classifier)
        with torch.no_grad():
            features = classifier.features(samples.float())
        gen = torch.Generator().manual_seed(0)
        boots = [frechet_distance(features[torch.randint(0, len(features), (len(features),), generator=gen)],
                                  reference) for _ in range(args.bootstrap)]
        p = report.confident
        results[name] = dict(nll=bound.bpd, per_image=bound.per_image, nll_seconds=nll_seconds, confident=p,
                             confident_se=(p * (1 - p) / args.n) ** 0.5, frechet=report.frechet,
                             frechet_se=float(torch.tensor(boots).std()), sample_seconds=sample_seconds,
                             classes=report.histogram)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_image"}), flush=True)
    diff = results["bfloat16"]["per_image"] - results["float32"]["per_image"]
    print(f"NLL bf16 - float32: {diff.mean().item():+.4f} bits/dim (paired standard error "
          f"{diff.std().item() / len(diff) ** 0.5:.4f}, over {len(diff)} images)")


if __name__ == "__main__":
    main()
