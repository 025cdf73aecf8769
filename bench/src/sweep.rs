//! `ouro-bench --sweep PARAM=V1,V2,...`: one row per value of a speculation parameter, for
//! every compared strategy that uses it, the other parameters left at their flags (one
//! factor at a time, so a sweep over four parameters costs their values' sum, not product).

use decoding::{DecodeParams, Strategy};
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Gamma,
    Level,
    Window,
    Guess,
    Topk,
    TrieBudget,
    /// `draft_stop` in hundredths (sweep values are whole numbers).
    DraftStop,
}

const PARAMS: [(Param, &str); 7] = [
    (Param::Gamma, "gamma"),
    (Param::Level, "level"),
    (Param::Window, "window"),
    (Param::Guess, "guess"),
    (Param::Topk, "topk"),
    (Param::TrieBudget, "trie_budget"),
    (Param::DraftStop, "draft_stop"),
];

impl Param {
    pub fn name(self) -> &'static str {
        PARAMS
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }

    /// Whether `strategy` reads this parameter (auto sizes its rounds itself).
    pub fn used_by(self, strategy: Strategy) -> bool {
        use Strategy as S;
        match self {
            Param::Gamma => matches!(strategy, S::Speculative | S::Ouroboros),
            Param::Level | Param::Window | Param::Guess => {
                matches!(strategy, S::Lookahead | S::Ouroboros)
            }
            Param::Topk => strategy == S::Ouroboros,
            Param::TrieBudget => matches!(strategy, S::Trie | S::Ouroboros),
            Param::DraftStop => strategy == S::Speculative,
        }
    }

    pub fn get(self, p: &DecodeParams) -> usize {
        match self {
            Param::Gamma => p.gamma,
            Param::Level => p.lookahead.level,
            Param::Window => p.lookahead.window,
            Param::Guess => p.lookahead.guess,
            Param::Topk => p.topk,
            Param::TrieBudget => p.trie_budget,
            Param::DraftStop => (p.draft_stop * 100.0).round() as usize,
        }
    }

    pub fn set(self, p: &mut DecodeParams, value: usize) {
        match self {
            Param::Gamma => p.gamma = value,
            Param::Level => p.lookahead.level = value,
            Param::Window => p.lookahead.window = value,
            Param::Guess => p.lookahead.guess = value,
            Param::Topk => p.topk = value,
            Param::TrieBudget => p.trie_budget = value,
            Param::DraftStop => p.draft_stop = value as f32 / 100.0,
        }
    }
}

/// One swept parameter and its values.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub param: Param,
    pub values: Vec<usize>,
}

impl FromStr for Axis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let names = || {
            PARAMS
                .iter()
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (name, values) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected PARAM=V1,V2,... (PARAM: {})", names()))?;
        let param = PARAMS
            .iter()
            .find(|(_, n)| *n == name.trim())
            .map(|(p, _)| *p)
            .ok_or_else(|| format!("'{name}' is not a sweep parameter ({})", names()))?;
        let values = values
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{name}: '{v}' is not a whole number"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if values.is_empty() {
            return Err(format!("{name}: no values"));
        }
        Ok(Axis { param, values })
    }
}

/// One row of a sweep: a strategy with one parameter changed from the flags' value.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub strategy: Strategy,
    pub param: Param,
    pub value: usize,
    /// The flags' value (the row that matches it is the unswept configuration).
    pub is_default: bool,
}

impl Point {
    pub fn name(&self) -> String {
        let mark = if self.is_default { "*" } else { "" };
        format!(
            "{} {}={}{mark}",
            self.strategy.name(),
            self.param.name(),
            self.value
        )
    }

    pub fn apply(&self, p: &mut DecodeParams) {
        self.param.set(p, self.value);
    }
}

/// Every (strategy, parameter, value) row, in the order given; strategies that use none
/// of the swept parameters get no rows.
pub fn points(strategies: &[Strategy], axes: &[Axis], defaults: &DecodeParams) -> Vec<Point> {
    let mut out = Vec::new();
    for &strategy in strategies {
        for axis in axes.iter().filter(|a| a.param.used_by(strategy)) {
            for &value in &axis.values {
                out.push(Point {
                    strategy,
                    param: axis.param,
                    value,
                    is_default: value == axis.param.get(defaults),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_parse_and_bad_ones_say_why() {
        let a: Axis = "gamma=2, 4,6".parse().unwrap();
        assert_eq!((a.param, a.values), (Param::Gamma, vec![2, 4, 6]));
        let a: Axis = "trie_budget=0,16".parse().unwrap();
        assert_eq!(a.param, Param::TrieBudget);
        let a: Axis = "draft_stop=0,50".parse().unwrap();
        let mut p = DecodeParams::default();
        a.param.set(&mut p, a.values[1]);
        assert_eq!((p.draft_stop, a.param.get(&p)), (0.5, 50));
        assert!("gamma".parse::<Axis>().unwrap_err().contains("PARAM=V1"));
        assert!(
            "depth=2"
                .parse::<Axis>()
                .unwrap_err()
                .contains("not a sweep parameter")
        );
        assert!("topk=1,x".parse::<Axis>().unwrap_err().contains("'x'"));
    }

    #[test]
    fn points_vary_one_parameter_at_a_time_for_the_strategies_using_it() {
        let defaults = DecodeParams {
            gamma: 4,
            topk: 3,
            ..DecodeParams::default()
        };
        let axes: Vec<Axis> = ["gamma=2,4", "topk=1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let strategies = [Strategy::Speculative, Strategy::Ouroboros, Strategy::Auto];
        let names: Vec<String> = points(&strategies, &axes, &defaults)
            .iter()
            .map(Point::name)
            .collect();
        assert_eq!(
            names,
            [
                "speculative gamma=2",
                "speculative gamma=4*",
                "ouroboros gamma=2",
                "ouroboros gamma=4*",
                "ouroboros topk=1",
            ]
        );
        let mut p = defaults.clone();
        points(&strategies, &axes, &defaults)[4].apply(&mut p);
        assert_eq!((p.topk, p.gamma), (1, 4));
    }
}
