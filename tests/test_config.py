"""timm_sila.config: SilaConfig (the SilaNet settings, checked once) and the sila_* names."""
import pytest

from timm_sila.config import SilaConfig, sanitize_file_model_kwargs


@pytest.mark.usefixtures('no_network')
def test_sila_config_table():
    assert SilaConfig().to_kwargs() == dict(sila_sets=3, sila_beta=0.1, sila_decay=0.5, sila_taps=None,
                                            sila_branch=0, sila_head='conv3x3', sila_stripped=False)
    assert SilaConfig.from_kwargs(dict(sila_sets=4, sila_taps=('a', 'b', 2))).taps == ['a', 'b', 2]
    for bad in (dict(sets=True), dict(sets=2.0), dict(beta=float('nan')), dict(decay=-0.1), dict(branch=3),
                dict(branch=False), dict(taps=['a']), dict(taps='layer3'), dict(head='../x'), dict(stripped=1)):
        with pytest.raises(ValueError):
            SilaConfig(**bad)
    with pytest.raises(ValueError, match='Unknown SilaNet arguments'):
        SilaConfig.from_kwargs(dict(sila_gamma=1))
    assert sanitize_file_model_kwargs({'img_size': (32, 32), 'drop_rate': None}, 'f') == {'img_size': [32, 32]}
