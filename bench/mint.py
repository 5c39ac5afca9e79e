"""X509-SVID mint rate on one core against the crypto floor measured in the same process.

One mint = CSR DER in, CSR signature checked, leaf DER out (X509Minter.mint_der_from_csr).
The floor is what no implementation can beat: 1 / (one raw ECDSA P-256 verify + one raw
ECDSA P-256 sign), both with already-loaded keys. The three are measured in interleaved
blocks of a few milliseconds, timed in thread CPU time, so drifting CPU speed (turbo, busy
neighbours) hits them alike; the ratio is the median of the per-round ratios.

    python bench/mint.py [--seconds 6] [--csrs 256]

Last line: `mint_ratio=<mint rate / floor rate>` (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from issuer.ca import minting
from meshid.spiffe_id import SpiffeId, TrustDomain

BLOCK_OPS = 32  # ~5 ms blocks: the three cases alternate faster than the machine's speed drifts


def _block_us(fn: Callable[[int], None], base: int) -> float:
    """Microseconds of thread CPU time per call over one block (CPU time: a block is not
    charged for time the scheduler gave to other processes)."""
    start = time.thread_time_ns()
    for i in range(base, base + BLOCK_OPS):
        fn(i)
    return (time.thread_time_ns() - start) / BLOCK_OPS / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring time for each of verify/sign/mint")
    ap.add_argument("--csrs", type=int, default=256, help="distinct CSRs (keys) cycled through")
    ap.add_argument("--builder", action="store_true", help="also measure the CertificateBuilder path")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, no migrations

    now = dt.datetime.now(dt.UTC)
    td = TrustDomain("bench.example")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = minting.self_signed_ca(ca_key, td, 24 * 3600, now)
    minter = minting.X509Minter(ca_key, ca_cert, [])
    sid = SpiffeId.parse("spiffe://bench.example/ns/default/sa/frontend")
    csrs = []
    for _ in range(args.csrs):
        k = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(k, hashes.SHA256())
        csrs.append(csr.public_bytes(serialization.Encoding.DER))
    ncsr = len(csrs)

    # Floor inputs: a message the size of a real TBS, verified with a loaded key.
    sample = minter.mint_der_from_csr(csrs[0], sid, [], 3600, now)
    message = x509.load_der_x509_certificate(sample).tbs_certificate_bytes
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_pub = leaf_key.public_key()
    alg = ec.ECDSA(hashes.SHA256())
    signature = leaf_key.sign(message, alg)

    def verify(_: int) -> None:
        leaf_pub.verify(signature, message, alg)

    def sign(_: int) -> None:
        ca_key.sign(message, alg)

    def mint(i: int) -> None:
        minter.mint_der_from_csr(csrs[i % ncsr], sid, (), 3600, now)

    cases: dict[str, Callable[[int], None]] = {"verify": verify, "sign": sign, "mint": mint}
    if args.builder:
        slow = minting.X509Minter(ca_key, ca_cert, [], fast_path=False)

        def mint_builder(i: int) -> None:
            slow.mint_der_from_csr(csrs[i % ncsr], sid, (), 3600, now)

        cases["builder"] = mint_builder
    assert minter.fast_path

    for fn in cases.values():  # warm up caches and allocators
        for _ in range(10):
            _block_us(fn, 0)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    deadline = time.thread_time() + args.seconds * len(cases)
    base = 0
    while time.thread_time() < deadline:
        for name, fn in cases.items():
            samples[name].append(_block_us(fn, base))
        base += BLOCK_OPS
    rounds = len(samples["mint"])

    ratios = [(v + s) / m for v, s, m in zip(samples["verify"], samples["sign"], samples["mint"], strict=True)]
    med = {name: statistics.median(v) for name, v in samples.items()}
    floor_us = med["verify"] + med["sign"]
    print(f"{rounds} rounds of {BLOCK_OPS} ops per case, {ncsr} distinct CSRs (P-256 keys), CA P-256")
    print(f"raw_verify_us={med['verify']:.1f} raw_sign_us={med['sign']:.1f} floor_us={floor_us:.1f}")
    print(f"floor_rate={1e6 / floor_us:.0f}/s")
    print(f"mint_us={med['mint']:.1f} mint_rate={1e6 / med['mint']:.0f}/s")
    if "builder" in med:
        print(f"builder_mint_us={med['builder']:.1f} builder_ratio={floor_us / med['builder']:.2f}")
    print(f"ratio_per_round min={min(ratios):.2f} max={max(ratios):.2f}")
    print(f"mint_ratio={statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
