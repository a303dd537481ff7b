"""Equivariant diffusion prior over periodic disordered structures.

Objects, one job each: `schedule.VESchedule` (noise process), `score_model.EquivariantScoreModel`
(e3nn) or `painn_score_model.PaiNNScoreModel` (cheaper; the checkpoint names its class),
`loss.dsm_loss`, `samplers` (EulerMaruyama, PredictorCorrector, ProbabilityFlow,
RestartSampler), `neighbors.NeighborListCache` (Verlet skin), `prior.DiffusionPrior` /
`prior.load_prior` (the interface guidance uses), `sampling.sample_structures`, `train` (Lightning).
"""
