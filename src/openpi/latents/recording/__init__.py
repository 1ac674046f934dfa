"""What every producer of a latent store shares: the collection (`openpi.latents.collect`), the policy server
(`openpi.serving`), the replay (`openpi.latents.replay`) and the synthetic collection. None of them imports another's
internals; each imports these.

Modules: `records` (the keys of one recorded inference, its counterfactual and teacher-forced reruns' keys, the noise
of an episode), `reruns` (the policy calls: an inference, its counterfactual rerun, the teacher-forced twin, and the
check that one can run), `disk` (a full disk at setup, the free-space warning), `interrupt` (stopping cleanly on
SIGINT / SIGTERM).
"""
