//! Enums whose values cross process boundaries (shared memory, the event ring).
//!
//! A value read back may be anything a tenant wrote, so the conversion from the wire
//! takes the whole word and rejects what is out of range: truncating first (`v as u8`)
//! would turn 257 into a valid 1. One macro keeps the label, the list and the
//! conversion of every such enum in step.

/// Declares a fieldless enum with a stable label per variant:
/// `ALL` (every variant, in order), `name()` (the label used in metrics, logs and
/// traces) and `from_wire(u64)` (`None` for any value that is not a variant's).
#[macro_export]
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident: $repr:ty {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $( $(#[$vmeta])* $var = $val, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [$name; [$(stringify!($var)),+].len()] = [$($name::$var),+];

            /// The stable label: metrics, logs and traces use it.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$var => $label, )+
                }
            }

            /// The variant whose value is `v`, if any; never truncates `v`.
            pub fn from_wire(v: u64) -> Option<$name> {
                match v {
                    $( $val => Some($name::$var), )+
                    _ => None,
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    wire_enum! {
        /// A test enum.
        pub enum Colour: u8 {
            Red = 1 => "red",
            Blue = 2 => "blue",
        }
    }

    #[test]
    fn out_of_range_values_are_rejected_not_truncated() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::Blue]);
        assert_eq!(Colour::from_wire(2), Some(Colour::Blue));
        assert_eq!(Colour::Blue.name(), "blue");
        assert_eq!(Colour::from_wire(0), None);
        assert_eq!(Colour::from_wire(257), None, "257 as u8 would be 1");
        assert_eq!(Colour::from_wire(u64::MAX), None);
    }
}
