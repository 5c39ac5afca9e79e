"""X509-SVID mint rate on one core against the crypto floor measured in the same process.

One mint = CSR DER in, CSR signature checked, leaf DER out. Two paths are measured:
`per_call` (X509Minter.mint_der_from_csr, one SVID per call) and `batch`
(X509Minter.mint_batch_der over BLOCK_OPS CSRs, the path the server's batch signer uses).
The floor is what no implementation can beat: 1 / (one raw ECDSA P-256 verify + one raw
ECDSA P-256 sign), both with already-loaded keys. All cases run in interleaved blocks of a
few milliseconds, timed in thread CPU time, so drifting CPU speed (turbo, busy neighbours)
hits them alike; each ratio is the median of the per-round ratios.

    python bench/mint.py [--seconds 6] [--csrs 256] [--builder]

Last line: `mint_ratio=<batch mint rate / floor rate>` (goal >= 0.8).
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

BLOCK_OPS = 32  # ~5 ms blocks: cases alternate faster than the machine's speed drifts


def _block_us(run_block: Callable[[int], None], base: int) -> float:
    """Microseconds of thread CPU time per operation over one block of BLOCK_OPS operations
    (CPU time: a block is not charged for time the scheduler gave to other processes)."""
    start = time.thread_time_ns()
    run_block(base)
    return (time.thread_time_ns() - start) / BLOCK_OPS / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring time per case")
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
    assert minter.fast_path
    sid = SpiffeId.parse("spiffe://bench.example/ns/default/sa/frontend")
    csrs = []
    for _ in range(args.csrs):
        k = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(k, hashes.SHA256())
        csrs.append(csr.public_bytes(serialization.Encoding.DER))
    ncsr = len(csrs)
    requests = [minting.LeafRequest(c, sid, (), 3600) for c in csrs]

    # Floor inputs: a message the size of a real TBS, verified with a loaded key.
    sample = minter.mint_der_from_csr(csrs[0], sid, [], 3600, now)
    message = x509.load_der_x509_certificate(sample).tbs_certificate_bytes
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_pub = leaf_key.public_key()
    alg = ec.ECDSA(hashes.SHA256())
    signature = leaf_key.sign(message, alg)

    def verify(_: int) -> None:
        for _ in range(BLOCK_OPS):
            leaf_pub.verify(signature, message, alg)

    def sign(_: int) -> None:
        for _ in range(BLOCK_OPS):
            ca_key.sign(message, alg)

    def per_call(base: int) -> None:
        for i in range(base, base + BLOCK_OPS):
            minter.mint_der_from_csr(csrs[i % ncsr], sid, (), 3600, now)

    def batch(base: int) -> None:
        start = base % ncsr
        chunk = (requests + requests[:BLOCK_OPS])[start : start + BLOCK_OPS]
        out = minter.mint_batch_der(chunk, now)
        assert not any(isinstance(o, Exception) for o in out)

    cases: dict[str, Callable[[int], None]] = {
        "verify": verify,
        "sign": sign,
        "per_call": per_call,
        "batch": batch,
    }
    if args.builder:
        slow = minting.X509Minter(ca_key, ca_cert, [], fast_path=False)

        def builder(base: int) -> None:
            for i in range(base, base + BLOCK_OPS):
                slow.mint_der_from_csr(csrs[i % ncsr], sid, (), 3600, now)

        cases["builder"] = builder

    for run_block in cases.values():  # warm up caches and allocators
        for _ in range(5):
            _block_us(run_block, 0)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    deadline = time.thread_time() + args.seconds * len(cases)
    base = 0
    while time.thread_time() < deadline:
        for name, run_block in cases.items():
            samples[name].append(_block_us(run_block, base))
        base += BLOCK_OPS

    def ratio(name: str) -> float:
        per_round = [
            (v + s) / m for v, s, m in zip(samples["verify"], samples["sign"], samples[name], strict=True)
        ]
        return statistics.median(per_round)

    med = {name: statistics.median(v) for name, v in samples.items()}
    floor_us = med["verify"] + med["sign"]
    print(
        f"{len(samples['verify'])} rounds of {BLOCK_OPS} ops per case, {ncsr} distinct CSRs (P-256), CA P-256"
    )
    print(f"raw_verify_us={med['verify']:.1f} raw_sign_us={med['sign']:.1f} floor_us={floor_us:.1f}")
    print(f"floor_rate={1e6 / floor_us:.0f}/s")
    for name in cases:
        if name in ("verify", "sign"):
            continue
        print(f"{name}: mint_us={med[name]:.1f} rate={1e6 / med[name]:.0f}/s ratio={ratio(name):.2f}")
    print(f"mint_ratio={ratio('batch'):.2f}")


if __name__ == "__main__":
    main()
