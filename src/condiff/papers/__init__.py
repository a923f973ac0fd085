"""Papers: the published experiments end to end, each with a report beside its figures. The demo (`demo`: the
paper's Figure 1 on 8x8 digits) and `condiff reproduce EXPERIMENT` (`reproduce`: minority classes and
fine-tuning on MNIST and Fashion-MNIST; attribution-digits hands over to condiff.validation)."""
