"""The paper's published numbers (Zhang et al., ACL 2021), shown beside ours in reports."""
from __future__ import annotations

PAPER_SOURCE = "Zhang et al. 2021"
# Zhang et al. 2021, table 3 (200 test instances per data set; x100). No TracIn column; SentiHood uses K=50.
PAPER_TABLE3: dict[str, dict[str, dict[str, float]]] = {
    "MAMS": {
        "Sag@10": {"IF": 14.22, "IF+": 17.17, "IF++": 21.74, "TracInF": 15.89, "TracIn+": 22.65, "TracIn++": 23.92},
        "Sag@100": {"IF": 14.65, "IF+": 15.10, "IF++": 19.83, "TracInF": 15.97, "TracIn+": 19.54, "TracIn++": 21.32},
        "Lag@10": {"IF": 21.63, "IF+": 25.66, "IF++": 65.41, "TracInF": 38.20, "TracIn+": 8.60, "TracIn++": 78.03},
        "Lag@100": {"IF": 26.07, "IF+": 25.66, "IF++": 62.52, "TracInF": 43.19, "TracIn+": 6.27, "TracIn++": 75.02},
        "Ral -20%": {"IF": 9.80, "IF+": 5.64, "IF++": 3.55, "TracInF": 9.80, "TracIn+": 11.89, "TracIn++": 16.05},
        "Ral -50%": {"IF": 28.55, "IF+": 1.47, "IF++": 18.14, "TracInF": 22.30, "TracIn+": 5.64, "TracIn++": 18.14},
    },
    "SentiHood": {
        "Sag@10": {"IF": 4.69, "IF+": 4.75, "IF++": 22.54, "TracInF": 3.07, "TracIn+": 0.98, "TracIn++": 26.21},
        "Sag@50": {"IF": 3.56, "IF+": 7.82, "IF++": 22.21, "TracInF": 1.78, "TracIn+": 1.61, "TracIn++": 23.43},
        "Lag@10": {"IF": 53.00, "IF+": 41.91, "IF++": 61.96, "TracInF": 55.91, "TracIn+": 18.22, "TracIn++": 66.65},
        "Lag@50": {"IF": 56.38, "IF+": 44.05, "IF++": 63.16, "TracInF": 59.66, "TracIn+": 17.49, "TracIn++": 66.72},
        "Ral -20%": {"IF": 10.56, "IF+": 16.21, "IF++": 6.91, "TracInF": 9.23, "TracIn+": 6.91, "TracIn++": 9.23},
        "Ral -50%": {"IF": 16.21, "IF+": 18.53, "IF++": 11.05, "TracInF": 27.83, "TracIn+": 9.23, "TracIn++": 4.58},
    },
}
# Zhang et al. 2021, table 4 (MAMS; Spearman with ground truth x100, 5 runs each).
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "Control": {"mean": 55.11, "var": 4.84},
    "TracIn++": {"mean": 60.14, "var": 3.57},
    "IF++": {"mean": 59.37, "var": 20.50},
}
DATASETS = {"mams": "MAMS", "sentihood": "SentiHood"}
