"""Attribution: which training examples a generated sample comes from, and at which sampling step
(Journey-TRAK; D-TRAK's output function). Per-example gradients of an output function (`features`),
a seeded projection that runs fast on CPUs and GPUs (`projector`), and the TRAK estimator (`trak`)."""
