"""Datasets: loading, seeded stratified subsets, standardisation, and preparing offline copies."""
