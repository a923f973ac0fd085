"""Attribution: which training examples a generated sample comes from, and at which sampling step
(Journey-TRAK; D-TRAK's output function). Per-example gradients of an output function (`features`, at about
one backward pass through layer hooks in `per_example`), a seeded projection that runs fast on CPUs and GPUs
(`projector`), features on disk shared out among processes (`store`), the TRAK estimator (`trak`), the baselines
(`baselines`) and the linear datamodeling score with its two-way intervals and ceiling (`validation`)."""
