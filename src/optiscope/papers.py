"""The papers optiscope reproduces, with full references, and the lookup from an experiment's paper key.

Every experiment registers the paper it reproduces under a short key (``"000"`` .. ``"004"``, the order in which
the papers were collected); :func:`paper` turns that key into a :class:`Reference` with authors, year, title,
venue and arXiv id, and :func:`short_name` into the name a reader knows (``"Jiang et al. 2023"``). Docstrings in
the package cite papers by that short name and a section (``Velikanov et al. 2023, §5, Prop. 3``).

This module is the bottom layer: it imports nothing from optiscope.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PAPERS", "Reference", "paper", "short_name"]


@dataclass(frozen=True)
class Reference:
    """One bibliographic reference.

    ``short`` is the in-text citation (``"Jiang et al. 2023"``); ``authors`` the full author list; ``venue`` where
    it was published (``"NeurIPS 2023"``); ``arxiv`` the arXiv identifier or ``""``; ``note`` a remark on the
    version cited; ``based_on`` the underlying papers when the reference is a set of research notes.
    """

    key: str
    short: str
    authors: tuple[str, ...]
    year: int
    title: str
    venue: str
    arxiv: str = ""
    note: str = ""
    based_on: tuple[Reference, ...] = field(default=())

    @property
    def url(self) -> str:
        """The arXiv abstract page, or ``""`` when the reference has no arXiv id."""
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else ""

    def citation(self) -> str:
        """The full reference as one line: ``A. B, C. D. *Title.* Venue (arXiv:id).`` plus the note, if any."""
        arxiv = f" (arXiv:{self.arxiv})" if self.arxiv else ""
        title = self.title if self.title.endswith(("?", "!", ".")) else self.title + "."
        text = f"{', '.join(self.authors)}. *{title}* {self.venue}{arxiv}."
        if self.note:
            text += f" {self.note}"
        return text


_LI_ARORA_2020 = Reference(
    key="", short="Li & Arora 2020", authors=("Z. Li", "S. Arora"), year=2020,
    title="An Exponential Learning Rate Schedule for Deep Learning", venue="ICLR 2020", arxiv="1910.07454")
_ARORA_COHEN_HAZAN_2018 = Reference(
    key="", short="Arora et al. 2018", authors=("S. Arora", "N. Cohen", "E. Hazan"), year=2018,
    title="On the Optimization of Deep Networks: Implicit Acceleration by Overparameterization", venue="ICML 2018",
    arxiv="1802.06509")
_ARORA_COHEN_HU_LUO_2019 = Reference(
    key="", short="Arora et al. 2019", authors=("S. Arora", "N. Cohen", "W. Hu", "Y. Luo"), year=2019,
    title="Implicit Regularization in Deep Matrix Factorization", venue="NeurIPS 2019", arxiv="1905.13655")

PAPERS: dict[str, Reference] = {
    "000": Reference(
        key="000", short="Jiang et al. 2023", authors=("K. Jiang", "D. Malik", "Y. Li"), year=2023,
        title="How Does Adaptive Optimization Impact Local Neural Network Geometry?", venue="NeurIPS 2023",
        arxiv="2211.02254"),
    "001": Reference(
        key="001", short="Cattaneo et al. 2024", authors=("M. D. Cattaneo", "J. M. Klusowski", "B. Shigida"),
        year=2024, title="On the Implicit Bias of Adam", venue="ICML 2024", arxiv="2309.00079"),
    "002": Reference(
        key="002", short="Orvieto et al. 2022",
        authors=("A. Orvieto", "J. Kohler", "D. Pavllo", "T. Hofmann", "A. Lucchi"), year=2022,
        title="Vanishing Curvature in Randomly Initialized Deep ReLU Networks", venue="AISTATS 2022",
        arxiv="2106.03763",
        note="First circulated as *Vanishing Curvature and the Power of Adaptive Methods in Randomly Initialized "
             "Deep Networks* (arXiv 2021)."),
    "003": Reference(
        key="003", short="Li & Arora 2020; Arora et al. 2018, 2019",
        authors=("research notes",), year=2020,
        title="Exponential learning rates, scale invariance, and deep linear networks as preconditioners",
        venue="research notes after Li & Arora (ICLR 2020), Arora, Cohen & Hazan (ICML 2018) and "
              "Arora, Cohen, Hu & Luo (NeurIPS 2019)",
        note="optiscope cites the underlying papers.",
        based_on=(_LI_ARORA_2020, _ARORA_COHEN_HAZAN_2018, _ARORA_COHEN_HU_LUO_2019)),
    "004": Reference(
        key="004", short="Velikanov et al. 2023", authors=("M. Velikanov", "D. Kuznedelev", "D. Yarotsky"),
        year=2023,
        title="A view of mini-batch SGD via generating functions: conditions of convergence, phase transitions, "
              "benefit from negative momenta",
        venue="ICLR 2023", arxiv="2206.11124"),
}
"""The five references by paper key (the key an experiment registers with ``paper=``)."""


def paper(key: str) -> Reference:
    """The :class:`Reference` registered under ``key`` (``"000"`` .. ``"004"``; an int such as 4 is accepted).

    Raises ``ValueError`` naming the known keys when ``key`` is unknown."""
    k = f"{key:03d}" if isinstance(key, int) and not isinstance(key, bool) else str(key).strip()
    try:
        return PAPERS[k]
    except KeyError:
        raise ValueError(f"unknown paper key {key!r}; known: {', '.join(PAPERS)}") from None


def short_name(key: str) -> str:
    """The in-text citation of the paper registered under ``key`` (``"000"`` -> ``"Jiang et al. 2023"``).

    Several keys joined by ``","`` or ``"+"`` give the short names joined by ``"; "``. Raises ``ValueError`` for
    an unknown key."""
    parts = [p for p in str(key).replace("+", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty paper key {key!r}")
    return "; ".join(paper(p).short for p in parts)
