//! The storage tier: one type for the ABI, the daemon and the router.

use crate::bindings as b;

/// A storage tier, fastest first (`Hbm < Host < Nvme`), so `max` of the tiers a load used
/// is the slowest one. "In no tier" is `Option::<Tier>::None`; on the wire it is
/// `KVP_TIER_NONE` ([`Tier::raw_or_none`], [`Tier::from_raw`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[repr(u8)]
pub enum Tier {
    /// G1: device memory (host memory standing in for it on the host backend).
    Hbm = 0,
    /// G2: the pinned host pool.
    Host = 1,
    /// G3: NVMe slots.
    Nvme = 2,
}

impl Tier {
    /// The tiers, fastest first.
    pub const ALL: [Tier; 3] = [Tier::Hbm, Tier::Host, Tier::Nvme];
    /// `enum kvp_tier`'s code for "in no tier".
    pub const NONE_RAW: u32 = b::kvp_tier_KVP_TIER_NONE;

    /// Position in [`Tier::ALL`] (and in a [`PerTier`]).
    pub const fn index(self) -> usize {
        self as usize
    }

    pub const fn name(self) -> &'static str {
        match self {
            Tier::Hbm => "hbm",
            Tier::Host => "host",
            Tier::Nvme => "nvme",
        }
    }

    /// Bit of this tier in a tier mask.
    pub const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The ABI code (`enum kvp_tier`).
    pub const fn raw(self) -> u32 {
        match self {
            Tier::Hbm => b::kvp_tier_KVP_TIER_HBM,
            Tier::Host => b::kvp_tier_KVP_TIER_HOST,
            Tier::Nvme => b::kvp_tier_KVP_TIER_NVME,
        }
    }

    /// The ABI code of a tier or of none.
    pub const fn raw_or_none(tier: Option<Tier>) -> u32 {
        match tier {
            Some(t) => t.raw(),
            None => Self::NONE_RAW,
        }
    }

    /// The tier (or none) an ABI code names; `None` for a code that names nothing.
    pub fn from_raw(raw: u32) -> Option<Option<Tier>> {
        if raw == Self::NONE_RAW {
            return Some(None);
        }
        Tier::ALL.into_iter().find(|t| t.raw() == raw).map(Some)
    }
}

impl core::fmt::Display for Tier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per tier, indexed by [`Tier`] (instead of arrays indexed by tier numbers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(transparent)
)]
pub struct PerTier<T>(pub [T; 3]);

impl<T> PerTier<T> {
    pub fn from_fn(mut f: impl FnMut(Tier) -> T) -> Self {
        PerTier([f(Tier::Hbm), f(Tier::Host), f(Tier::Nvme)])
    }

    /// The same value for every tier.
    pub fn splat(value: T) -> Self
    where
        T: Clone,
    {
        PerTier([value.clone(), value.clone(), value])
    }

    /// `(tier, value)`, fastest first.
    pub fn iter(&self) -> impl Iterator<Item = (Tier, &T)> {
        Tier::ALL.into_iter().zip(self.0.iter())
    }

    pub fn values(&self) -> core::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn map<U>(self, f: impl FnMut(T) -> U) -> PerTier<U> {
        PerTier(self.0.map(f))
    }
}

impl<T> core::ops::Index<Tier> for PerTier<T> {
    type Output = T;
    fn index(&self, tier: Tier) -> &T {
        &self.0[tier.index()]
    }
}

impl<T> core::ops::IndexMut<Tier> for PerTier<T> {
    fn index_mut(&mut self, tier: Tier) -> &mut T {
        &mut self.0[tier.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_codes_round_trip_and_order_is_speed_order() {
        for t in Tier::ALL {
            assert_eq!(Tier::from_raw(t.raw()), Some(Some(t)));
            assert_eq!(Tier::ALL[t.index()], t);
        }
        assert_eq!(Tier::from_raw(Tier::NONE_RAW), Some(None));
        assert_eq!(Tier::from_raw(99), None);
        assert_eq!(Tier::raw_or_none(None), b::kvp_tier_KVP_TIER_NONE);
        assert!(Tier::Hbm < Tier::Host && Tier::Host < Tier::Nvme);
        let mut p = PerTier::splat(0u32);
        p[Tier::Nvme] = 7;
        assert_eq!(p.0, [0, 0, 7]);
        assert_eq!(
            p.iter().map(|(t, _)| t).collect::<std::vec::Vec<_>>(),
            Tier::ALL
        );
    }
}
