"""Validation: is attribution right? Retrain on random subsets and see whether the scores predicted what
retraining did. Models and measurements (`counterfactual`), the methods compared and every choice among them
(`methods`), the linear datamodeling score (`lds`), the per-step removal test (`removal`), and
`condiff reproduce attribution-digits` with its report (`reproduce`, `report`)."""
