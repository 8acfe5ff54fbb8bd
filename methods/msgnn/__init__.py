"""MSGNN single-image deraining (IJCAI 2024) on pyops k-NN patch graphs; see README.md."""
