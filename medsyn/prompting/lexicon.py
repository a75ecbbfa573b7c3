"""A curated chest-CT lexicon: anatomy terms, pathology terms, and modifiers that are neither.

`categorize` sorts a vocabulary candidate by its key (singular words, see `medsyn.prompting.text`):
an exact lexicon entry gets its category; a phrase made only of modifiers is a "modifier"; a modifier
phrase in front of a lexicon entry ("small pleural effusion") is a qualified form of that entry; anything
else is "other", for the reviewer to move or drop. Laterality-qualified anatomy ("left lung",
"right hilum") is listed as anatomy in its own right, since side is part of where a finding is.
"""

from __future__ import annotations

from medsyn.prompting.text import term_key

ANATOMY_CATEGORY, PATHOLOGY_CATEGORY, MODIFIER_CATEGORY, OTHER_CATEGORY = (
    "anatomy", "pathology", "modifier", "other",
)  # fmt: skip
CATEGORIES = (ANATOMY_CATEGORY, PATHOLOGY_CATEGORY, MODIFIER_CATEGORY, OTHER_CATEGORY)

# anatomy that takes a side: also listed as "left X", "right X" (and "bilateral X" where it reads well)
LATERAL_ANATOMY = (
    "lung", "hemithorax", "hilum", "hilar", "lung base", "lung apex", "base", "apex", "upper lobe",
    "lower lobe", "main bronchus", "mainstem bronchus", "pleural space", "pleura", "hemidiaphragm",
    "diaphragm", "chest wall", "axilla", "axillary", "breast", "clavicle", "rib", "kidney", "adrenal",
    "adrenal gland", "pulmonary artery", "subclavian artery", "brachiocephalic vein",
    "jugular vein", "atrium", "ventricle", "costophrenic angle", "paratracheal", "supraclavicular",
    "lung field", "upper lung", "lower lung", "lung zone", "upper zone", "lower zone",
)  # fmt: skip
BILATERAL_ANATOMY = ("lung", "hilum", "lung base", "lung apex", "upper lobe", "lower lobe", "pleural space",
                     "hemithorax", "lung field", "upper lung", "lower lung", "axilla")  # fmt: skip

ANATOMY = LATERAL_ANATOMY + (
    # lungs, lobes, segments
    "lungs", "pulmonary", "parenchyma", "lung parenchyma", "pulmonary parenchyma", "parenchymal",
    "right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe",
    "middle lobe", "lingula", "lingular", "lobar", "segment", "segmental", "subsegmental",
    "apical segment", "posterior segment", "anterior segment", "apicoposterior segment",
    "superior segment", "lateral segment", "medial segment", "superior lingular segment",
    "inferior lingular segment", "anteromedial basal segment", "medial basal segment",
    "anterior basal segment", "lateral basal segment", "posterior basal segment", "lung bases",
    "lung apices", "bases", "apices", "basal", "apical", "subpleural", "perihilar", "peribronchial",
    "centrilobular", "interstitium", "interstitial", "fissure", "major fissure", "minor fissure",
    "interlobular septum", "alveolar", "airspace",
    # airway
    "airway", "airways", "central airway", "trachea", "tracheal", "carina", "bronchus", "bronchi",
    "bronchial", "bronchial tree", "bronchiole", "bronchiolar", "lobar bronchus", "segmental bronchus",
    "bronchus intermedius", "larynx",
    # pleura, mediastinum, heart, vessels
    "pleural", "pleural surface", "visceral pleura", "parietal pleura", "mediastinum", "mediastinal",
    "anterior mediastinum", "posterior mediastinum", "heart", "cardiac", "pericardium", "pericardial",
    "cardiac silhouette", "coronary artery", "coronary", "left atrium", "right atrium",
    "left ventricle", "right ventricle", "aorta", "aortic", "thoracic aorta", "ascending aorta",
    "descending aorta", "aortic arch", "aortic root", "aortic valve", "mitral valve",
    "main pulmonary artery", "pulmonary arteries", "pulmonary trunk", "pulmonary vein",
    "pulmonary veins", "pulmonary vasculature", "vascular", "vessel", "vasculature", "superior vena cava",
    "inferior vena cava", "vena cava", "azygos", "azygos vein", "thyroid", "thyroid gland", "thymus",
    "esophagus", "esophageal", "lymph node", "node", "nodal", "hilar node", "mediastinal node",
    "subcarinal", "prevascular", "aortopulmonary window",
    # chest wall, bones, diaphragm, upper abdomen
    "ribs", "costal", "sternum", "sternal", "vertebra", "vertebral", "vertebral body", "spine",
    "thoracic spine", "spinal", "scapula", "clavicles", "shoulder", "soft tissue", "chest", "thorax",
    "thoracic", "thoracic inlet", "diaphragmatic", "hemidiaphragms", "costophrenic", "cardiophrenic",
    "liver", "hepatic", "spleen", "stomach", "upper abdomen", "gallbladder", "pancreas",
)  # fmt: skip

# focal lesions take a size ("a small nodule", "a 7 mm nodule"); the other pathology takes a severity
FOCAL_PATHOLOGY = (
    "nodule", "nodules", "pulmonary nodule", "mass", "lesion", "bulla", "bullae", "bleb", "cyst",
    "granuloma", "calcified granuloma", "cavity", "cavitation", "abscess", "lymph node enlargement",
    "enlarged lymph node", "micronodule", "ground-glass nodule", "solid nodule", "part-solid nodule",
    "pneumatocele", "hernia", "hiatal hernia", "aneurysm", "fracture", "calcification", "plaque",
    "pleural plaque", "tumor", "neoplasm", "metastasis", "embolus", "thrombus", "filling defect",
    "granulomatous", "scar",
)  # fmt: skip
PATHOLOGY = FOCAL_PATHOLOGY + (
    "effusion", "pleural effusion", "pericardial effusion", "pneumothorax", "hydropneumothorax",
    "hemothorax", "empyema", "consolidation", "airspace consolidation", "airspace disease",
    "opacity", "opacities", "ground-glass opacity", "ground-glass", "ground-glass attenuation",
    "emphysema", "centrilobular emphysema", "paraseptal emphysema", "panlobular emphysema",
    "bullous emphysema", "bullous", "atelectasis", "compressive atelectasis", "subsegmental atelectasis",
    "linear atelectasis", "bibasilar atelectasis", "collapse", "cardiomegaly", "enlarged heart",
    "bronchiectasis", "traction bronchiectasis", "bronchial wall thickening", "bronchiolitis",
    "mucus plugging", "tree-in-bud", "fibrosis", "pulmonary fibrosis", "fibrotic", "honeycombing",
    "reticulation", "reticular", "interstitial thickening", "septal thickening",
    "interlobular septal thickening", "lymphadenopathy", "mediastinal lymphadenopathy",
    "hilar lymphadenopathy", "pleural thickening", "pneumonia", "pneumonitis", "infiltrate",
    "edema", "pulmonary edema", "interstitial edema", "congestion", "vascular congestion",
    "embolism", "pulmonary embolism", "air bronchogram", "air trapping", "mosaic attenuation",
    "scarring", "atherosclerosis", "atherosclerotic", "coronary calcification", "aortic calcification",
    "dilatation", "dilation", "ectasia", "aneurysmal", "pulmonary hypertension", "cardiomyopathy",
    "degenerative", "spondylosis", "osteophyte", "compression fracture", "pneumomediastinum",
    "subcutaneous emphysema", "hyperinflation", "infection", "inflammation", "malignancy",
    "neoplastic", "metastatic", "granulomatous disease", "sarcoidosis", "tuberculosis",
    "interstitial lung disease", "crazy paving", "halo", "cavitary", "necrosis", "hemorrhage",
    "thickening", "wall thickening", "stenosis", "narrowing", "obstruction", "volume loss",
    "elevation", "eventration", "hiatus hernia", "goiter", "thyroid nodule",
)  # fmt: skip

MODIFIERS = (
    # laterality and position
    "left", "right", "bilateral", "unilateral", "bibasilar", "biapical", "upper", "lower", "middle",
    "anterior", "posterior", "lateral", "medial", "superior", "inferior", "central", "peripheral",
    "dependent", "basilar", "diffuse", "focal", "multifocal", "patchy", "scattered", "streaky",
    "linear", "nodular", "round", "rounded", "irregular", "spiculated", "lobulated", "well-defined",
    "ill-defined", "solitary", "multiple", "several", "numerous", "few",
    # size and severity
    "small", "tiny", "large", "massive", "moderate", "mild", "severe", "minimal", "marked", "trace",
    "extensive", "subtle", "slight", "prominent", "enlarged", "enlargement", "increased", "decreased",
    "subcentimeter", "new", "stable", "chronic", "acute", "subacute", "old", "early", "advanced",
    "solid", "calcified", "noncalcified", "dense", "faint", "predominant", "predominantly",
)  # fmt: skip

# anatomy adjectives read as a place through a noun: "in the pleural space", not "in the pleural"
PLACE_NOUN = {
    "pleural": "pleural space", "pulmonary": "pulmonary parenchyma", "cardiac": "cardiac silhouette",
    "mediastinal": "mediastinal structures", "hilar": "hilar region", "bronchial": "bronchial tree",
    "aortic": "aortic arch", "tracheal": "tracheal wall", "pericardial": "pericardial space",
    "parenchymal": "parenchymal region", "basal": "basal segments", "apical": "apical region",
    "subpleural": "subpleural region", "perihilar": "perihilar region", "interstitial": "interstitium",
    "vertebral": "vertebral bodies", "esophageal": "esophageal wall", "costal": "costal margin",
    "lingular": "lingular segments", "lobar": "lobar bronchi", "thoracic": "thoracic cavity",
    "diaphragmatic": "diaphragmatic surface", "axillary": "axillary region", "nodal": "nodal stations",
    "subcarinal": "subcarinal region", "prevascular": "prevascular space", "costophrenic": "costophrenic angle",
    "cardiophrenic": "cardiophrenic angle", "peribronchial": "peribronchial region",
    "centrilobular": "centrilobular regions", "alveolar": "alveolar spaces", "hepatic": "hepatic dome",
    "spinal": "spinal canal", "sternal": "sternal region", "vascular": "vascular structures",
    "coronary": "coronary arteries", "segmental": "segmental bronchi", "subsegmental": "subsegmental bronchi",
    "bronchiolar": "bronchiolar walls", "paratracheal": "paratracheal region",
    "supraclavicular": "supraclavicular region", "adrenal": "adrenal gland",
}  # fmt: skip


def _lateral_forms() -> list[str]:
    forms = [f"{side} {term}" for term in LATERAL_ANATOMY for side in ("left", "right")]
    return forms + [f"bilateral {term}" for term in BILATERAL_ANATOMY]


def _keys(terms) -> dict[tuple[str, ...], None]:
    return {term_key(t): None for t in terms}


_ANATOMY_KEYS = _keys(list(ANATOMY) + _lateral_forms())
_PATHOLOGY_KEYS = _keys(PATHOLOGY)
_MODIFIER_KEYS = _keys(MODIFIERS)
_FOCAL_KEYS = _keys(FOCAL_PATHOLOGY)
_LATERAL_KEYS = _keys(LATERAL_ANATOMY)


def lexicon_category(key: tuple[str, ...]) -> str | None:
    """The category of an exact lexicon entry, or None."""
    if key in _ANATOMY_KEYS:
        return ANATOMY_CATEGORY
    if key in _PATHOLOGY_KEYS:
        return PATHOLOGY_CATEGORY
    if key in _MODIFIER_KEYS:
        return MODIFIER_CATEGORY
    return None


def categorize(term: str) -> tuple[str, str | None]:
    """(category, qualified) for a candidate term: `qualified` names the lexicon entry that a
    modifier phrase qualifies ("small pleural effusion" -> ("pathology", "pleural effusion")), else None."""
    key = term_key(term)
    found = lexicon_category(key)
    if found is not None:
        return found, None
    if key and all((word,) in _MODIFIER_KEYS for word in key):
        return MODIFIER_CATEGORY, None
    for start in range(1, len(key)):
        head, qualifiers = key[start:], key[:start]
        head_category = lexicon_category(head)
        if head_category in (ANATOMY_CATEGORY, PATHOLOGY_CATEGORY) and all(
            (word,) in _MODIFIER_KEYS for word in qualifiers
        ):
            return head_category, " ".join(head)
    return OTHER_CATEGORY, None


def is_focal(term: str) -> bool:
    """True for a pathology that is a countable lesion (takes a size rather than a severity)."""
    key = term_key(term)
    return key in _FOCAL_KEYS or bool(key) and (key[-1],) in _FOCAL_KEYS


def is_lateral(term: str) -> bool:
    """True for anatomy that can take a side and names none ("lung" yes, "left lung" and "heart" no)."""
    key = term_key(term)
    sides = {"left", "right", "bilateral"}
    return not sides & set(key) and key in _LATERAL_KEYS


def place(term: str) -> str:
    """The anatomy term as a place after "the": adjectives get a noun ("pleural" -> "pleural space")."""
    key = " ".join(term_key(term))
    if key in PLACE_NOUN:
        return PLACE_NOUN[key]
    if term.endswith(("al", "ar", "ic", "ary")):
        return f"{term} region"
    return term
