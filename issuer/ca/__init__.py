"""The issuer's CA: key sealing, key managers, upstream authorities and minting.

Modules by job: `sealing` (CA keys at rest), `keys` (key types, KeyManager), `upstream`
(who signs the CA certificate), `minting` (SVIDs and CA certificates), `template` (the
leaf fast path), `slots` (key lifecycle).
"""
