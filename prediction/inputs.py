"""The images of one new patient: any subset of the sequences, read and checked before any work.

A new patient has no label, so nothing ties the output to a sequence the way training ties it to
the labelled one; the label map is written on the *output* sequence: LGE whenever it is given
(the sequence MyoPS labels are drawn on, and the one scar is read from), otherwise the reference.
The reference, whose slices carry the grids, follows preprocessing's rule (the sequence with the
fewest slices, ties to LGE; :mod:`preprocessing.grid_stacks`). Reading goes through
:func:`datasets.raw.read_volume`, so missing or unreadable files, 2D/4D volumes and NaN voxels are
refused with the same messages as in preprocessing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets.labels import MODALITIES
from datasets.raw import RawDataError, Volume, discover_cases, read_volume
from preprocessing.grid_stacks import PREFERRED_REFERENCE
from preprocessing.slice_matching import choose_reference

#: The sequence that may come as a 4D cine series, of which one frame is read.
CINE = "bSSFP"


@dataclass(frozen=True)
class PatientImages:
    """One patient's volumes keyed by sequence name (a non-empty subset of MODALITIES)."""

    case_id: str
    volumes: Mapping[str, Volume]
    #: The frame taken from a 4D bSSFP cine (``load_patient(cine_frame=...)``), else None.
    cine_frame: int | None = None

    def __post_init__(self) -> None:
        if not self.volumes:
            raise ValueError(f"{self.case_id}: no input sequence given (need at least one of "
                             f"{list(MODALITIES)})")
        unknown = sorted(set(self.volumes) - set(MODALITIES))
        if unknown:
            raise ValueError(f"{self.case_id}: unknown sequence(s) {unknown}; known: "
                             f"{list(MODALITIES)}")

    @property
    def present(self) -> tuple[str, ...]:
        """Given sequences in channel order."""
        return tuple(name for name in MODALITIES if name in self.volumes)

    @property
    def reference(self) -> str:
        """The sequence whose slices carry the grids (fewest slices, ties to LGE)."""
        return choose_reference({name: self.volumes[name] for name in self.present},
                                prefer=PREFERRED_REFERENCE)

    @property
    def output(self) -> str:
        """The sequence whose native grid the label map is written on."""
        return PREFERRED_REFERENCE if PREFERRED_REFERENCE in self.volumes else self.reference


def load_patient(paths: Mapping[str, str | os.PathLike[str] | None],
                 case_id: str | None = None, cine_frame: int | None = None) -> PatientImages:
    """Read the given sequence files (``None`` entries are absent sequences).

    ``case_id`` defaults to the reference file's name without its NIfTI suffix. ``cine_frame``
    takes that frame (0-based) of a 4D bSSFP cine; MyoPS gives one cine frame per case, so a
    model trained on it reads a single frame too. The other sequences must be 3D.
    """
    given = {name: Path(path) for name, path in paths.items() if path is not None}
    if not given:
        raise ValueError(f"no input sequence given (need at least one of {list(MODALITIES)})")
    unknown = sorted(set(given) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown sequence(s) {unknown}; known: {list(MODALITIES)}")
    if cine_frame is not None and CINE not in given:
        raise ValueError(f"a cine frame ({cine_frame}) was asked but no {CINE} file was given")
    volumes = {name: read_volume(given[name], frame=cine_frame if name == CINE else None)
               for name in MODALITIES if name in given}
    if case_id is None:
        first = given.get(PREFERRED_REFERENCE, next(iter(given.values())))
        case_id = _strip_nifti_suffix(first.name)
    return PatientImages(case_id, volumes, cine_frame)


def case_dir_files(case_dir: str | os.PathLike[str], case_id: str | None = None,
                   sequences: Sequence[str] | None = None) -> tuple[str, dict[str, Path]]:
    """Files of one case in a raw folder laid out as :mod:`datasets.raw` discovers.

    ``case_dir`` is a MyoPS 2020 case folder (``CaseXXXX_{C0,LGE,T2}.nii.gz``) or a dataset root
    of either layout; a root holding several cases needs ``case_id``. A label file, if present,
    is ignored. Returns the case id and the files of ``sequences``, each of which must be there;
    ``None`` takes every sequence the case has.
    """
    case_dir = Path(case_dir)
    cases = discover_cases(case_dir, require_label=False,
                           required=() if sequences is None else sequences)
    if case_id is not None:
        chosen = [case for case in cases if case.case_id == case_id]
        if not chosen:
            known = ", ".join(case.case_id for case in cases[:10])
            raise RawDataError(f"{case_dir}: no case {case_id!r} (found {known}"
                               f"{', ...' if len(cases) > 10 else ''})")
    elif len(cases) > 1:
        raise RawDataError(f"{case_dir}: holds {len(cases)} cases; name one with --case_id")
    else:
        chosen = cases
    files = chosen[0]
    if not files.images:
        raise RawDataError(f"{case_dir}: case {files.case_id} has no image of "
                           f"{list(MODALITIES)}")
    wanted = files.images if sequences is None else sequences
    return files.case_id, {name: files.images[name] for name in MODALITIES if name in wanted}


def _strip_nifti_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
